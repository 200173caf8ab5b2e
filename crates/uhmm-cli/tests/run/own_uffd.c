/* A program that uses userfaultfd itself: it opens its own userfaultfd,
 * registers an 8 MiB anonymous mapping and an 8 MiB malloc block (both
 * above uhmm run's 1 MiB threshold, so managed by uhmm until then) for
 * MISSING faults, serves their faults from a thread with UFFDIO_COPY
 * (each page filled with a pattern of its index), checks every page, and
 * prints a checksum. Then it grows the mapping with mremap, and a freed
 * block's successor must be plain memory; and so in a forked child that
 * registers a block it inherited with a userfaultfd of its own.
 *
 * The program's userfaultfd asks for unmap events: freeing its registered
 * block waits until the server thread reads the event, and the server
 * mallocs a large block before each read (a thread of the program's that
 * needs malloc while a free of registered memory waits for it: uhmm run
 * must not unmap that block under its heap lock).
 *
 * Under uhmm run a VMA can be registered with one userfaultfd only: the
 * program's UFFDIO_REGISTER of a managed range failed with EBUSY. Exit
 * status 1 with a message on any failure. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096UL
#define LEN (8UL << 20)
/* The forked child's block: above glibc's mmap threshold then (raised to
 * about LEN by the frees above), so a mapping of its own in a plain run,
 * unmapped when freed; and small enough for uhmm run to keep it for reuse
 * when freed, unless it was handed over. */
#define DLEN (24UL << 20)

static int uffd = -1;
static char *page_buf;
static volatile long served;
static volatile long unmaps;

static void die(const char *what) {
    printf("FAIL %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

/* The registered ranges' starts: the pattern depends on the offset in
 * its range, not on the address (which changes from run to run). */
static uintptr_t bases[2];

/* The pattern of the page at `addr`. */
static uint64_t word(uintptr_t addr, size_t i) {
    uintptr_t base =
        bases[1] && addr >= bases[1] && addr - bases[1] < LEN ? bases[1] : bases[0];
    return ((addr - base) / PAGE) * 0x9e3779b97f4a7c15ULL + i;
}

static void *server(void *arg) {
    (void)arg;
    for (;;) {
        struct pollfd p = {.fd = uffd, .events = POLLIN};
        if (poll(&p, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        /* A large malloc before the read (see the top). */
        char *x = malloc(2UL << 20);
        if (!x)
            die("malloc in the server");
        x[0] = 1;
        free(x);
        struct uffd_msg msg;
        ssize_t n = read(uffd, &msg, sizeof msg);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            die("read uffd");
        }
        if (n == sizeof msg && msg.event == UFFD_EVENT_UNMAP) {
            __atomic_add_fetch(&unmaps, 1, __ATOMIC_RELAXED);
            continue;
        }
        if (n != sizeof msg || msg.event != UFFD_EVENT_PAGEFAULT) {
            printf("FAIL unexpected event %d\n", msg.event);
            fflush(stdout);
            exit(1);
        }
        uintptr_t at = msg.arg.pagefault.address & ~(PAGE - 1);
        uint64_t *w = (uint64_t *)page_buf;
        for (size_t i = 0; i < PAGE / 8; i++)
            w[i] = word(at, i);
        struct uffdio_copy c = {
            .dst = at, .src = (uintptr_t)page_buf, .len = PAGE, .mode = 0};
        /* Counted before the copy wakes the faulting thread. */
        __atomic_add_fetch(&served, 1, __ATOMIC_RELAXED);
        if (ioctl(uffd, UFFDIO_COPY, &c) < 0 && errno != EEXIST)
            die("UFFDIO_COPY");
    }
    return NULL;
}

static void do_register(void *at, size_t len, const char *what) {
    struct uffdio_register r = {
        .range = {.start = (uintptr_t)at, .len = len},
        .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &r) < 0) {
        printf("FAIL UFFDIO_REGISTER of the %s: %s\n", what, strerror(errno));
        fflush(stdout);
        exit(1);
    }
}

/* Reads every page of [at, at + len) (each fault served by the program's
 * thread), checks the pattern, and returns a checksum. */
static uint64_t check(char *at, size_t len, const char *what) {
    uint64_t sum = 0;
    for (size_t off = 0; off < len; off += PAGE) {
        uint64_t *w = (uint64_t *)(at + off);
        for (size_t i = 0; i < PAGE / 8; i += 61) {
            if (w[i] != word((uintptr_t)(at + off), i)) {
                printf("FAIL %s: page at offset %#zx word %zu reads %#llx\n", what,
                       off, i, (unsigned long long)w[i]);
                fflush(stdout);
                exit(1);
            }
            sum = sum * 31 + (w[i] & 0xffff);
        }
    }
    /* Written after the check: plain memory from now on. */
    for (size_t off = 0; off < len; off += PAGE)
        at[off] ^= 0x5a;
    uint64_t again = 0;
    for (size_t off = 0; off < len; off += PAGE)
        again += (unsigned char)at[off];
    return sum ^ again;
}

/* A new userfaultfd, through the system call or /dev/userfaultfd. */
static int open_uffd(uint64_t features) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev < 0)
            die("userfaultfd (system call and /dev/userfaultfd)");
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        if (fd < 0)
            die("USERFAULTFD_IOC_NEW");
        close(dev);
    }
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        die("UFFDIO_API");
    return fd;
}

/* In a forked child: registers the page-aligned inside of block `d` (which
 * it inherited) with a userfaultfd of its own, frees the block, and checks
 * that a new block is plain memory (no thread serves the child's
 * userfaultfd: a registered page would wait for ever, which the alarm
 * ends). Exit status 0 if so. */
static int child_frees_a_registered_block(char *d) {
    alarm(20);
    int cu = open_uffd(0);
    char *ds = (char *)(((uintptr_t)d + PAGE - 1) & ~(PAGE - 1));
    struct uffdio_register r = {
        .range = {.start = (uintptr_t)ds, .len = DLEN},
        .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(cu, UFFDIO_REGISTER, &r) < 0) {
        printf("FAIL child: UFFDIO_REGISTER of an inherited block: %s\n",
               strerror(errno));
        return 1;
    }
    free(d);
    char *e = malloc(DLEN + PAGE);
    if (!e) {
        printf("FAIL child: malloc after free\n");
        return 1;
    }
    char *es = (char *)(((uintptr_t)e + PAGE - 1) & ~(PAGE - 1));
    memset(es, 2, DLEN);
    if (madvise(es, DLEN, MADV_DONTNEED) != 0) {
        printf("FAIL child: madvise: %s\n", strerror(errno));
        return 1;
    }
    for (size_t off = 0; off < DLEN; off += PAGE)
        if (es[off] != 0) {
            printf("FAIL child: new block reads %d at %#zx after a discard\n",
                   es[off], off);
            return 1;
        }
    free(e);
    return 0;
}

int main(int argc, char **argv) {
    (void)argv;
    /* With an argument: 300 ms between each mapping and its registration,
     * for uhmm run --chaos to move its pages to the device meanwhile. */
    useconds_t wait = argc > 1 ? 300000 : 0;
    /* A hang is a failure, not a test that never ends. */
    alarm(60);
    uffd = open_uffd(UFFD_FEATURE_EVENT_UNMAP);
    page_buf = malloc(PAGE);
    if (!page_buf)
        die("malloc of a page");
    pthread_t t;
    if (pthread_create(&t, NULL, server, NULL) != 0)
        die("pthread_create");

    /* An anonymous mapping, with a guard page after it so that the mremap
     * below cannot grow it in place (whether the space after it is free
     * depends on the process's layout, which uhmm run changes: grown in
     * place, it keeps the registration, and the tail's faults reach the
     * program). */
    char *m = mmap(NULL, LEN + PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (m == MAP_FAILED || mprotect(m + LEN, PAGE, PROT_NONE))
        die("mmap");
    usleep(wait);
    bases[0] = (uintptr_t)m;
    do_register(m, LEN, "mapping");
    uint64_t sum_map = check(m, LEN, "mapping");

    /* A malloc block: its page-aligned inside. */
    char *b = malloc(LEN + PAGE);
    if (!b)
        die("malloc");
    char *bs = (char *)(((uintptr_t)b + PAGE - 1) & ~(PAGE - 1));
    usleep(wait);
    bases[1] = (uintptr_t)bs;
    do_register(bs, LEN, "malloc block");
    uint64_t sum_block = check(bs, LEN, "malloc block");

    /* The mapping grown (and moved, past its guard page: the kernel then
     * drops the program's registration, which did not ask for remap events): the
     * same contents and faults served as in a plain run, and uhmm does
     * not take the memory back. */
    long before = served;
    char *g = mremap(m, LEN, 2 * LEN, MREMAP_MAYMOVE);
    if (g == MAP_FAILED)
        die("mremap");
    uint64_t sum_tail = 0;
    for (size_t off = 0; off < 2 * LEN; off += PAGE)
        sum_tail = sum_tail * 31 + (unsigned char)g[off];
    long tail_faults = served - before;

    /* Waits until the server has read the unmap event. */
    free(b);
    if (unmaps == 0) {
        printf("FAIL no unmap event for the freed block\n");
        return 1;
    }
    /* A new block after the free is plain memory, not the program's
     * registration (a freed block uhmm keeps for reuse must not carry
     * it): written, discarded, it reads as zeros with no fault served. */
    char *c = malloc(LEN + PAGE);
    if (!c)
        die("malloc after free");
    char *cs = (char *)(((uintptr_t)c + PAGE - 1) & ~(PAGE - 1));
    memset(cs, 1, LEN);
    if (madvise(cs, LEN, MADV_DONTNEED) != 0)
        die("madvise");
    long served_before = served;
    for (size_t off = 0; off < LEN; off += PAGE)
        if (cs[off] != 0) {
            printf("FAIL new block reads %d at %#zx after a discard\n", cs[off], off);
            return 1;
        }
    if (served != served_before) {
        printf("FAIL the program served %ld faults of a new block\n",
               served - served_before);
        return 1;
    }
    free(c);

    /* A forked child and a block it inherited (written here first). */
    char *d = malloc(DLEN + PAGE);
    if (!d)
        die("malloc before fork");
    memset(d, 3, DLEN + PAGE);
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        int rc = child_frees_a_registered_block(d);
        fflush(stdout);
        _exit(rc);
    }
    int status;
    if (waitpid(pid, &status, 0) != pid)
        die("waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        printf("FAIL the child ended with status %#x\n", status);
        return 1;
    }
    free(d);

    printf("mapping %016llx block %016llx tail %016llx pages served %ld "
           "(tail %ld)\n",
           (unsigned long long)sum_map, (unsigned long long)sum_block,
           (unsigned long long)sum_tail, served, tail_faults);
    return 0;
}
