/* UFFDIO_REGISTER from a signal handler. The main thread allocates and
 * frees: small glibc blocks (the arena lock), or only large blocks (under
 * uhmm run, the library's heap lock: malloc, free, realloc). A SIGALRM
 * every 200 us registers one page of the current large block with the
 * program's own userfaultfd, then unregisters it.
 *
 * Under uhmm run the library hands a managed range over before the
 * registration, which takes locks and allocates: from a handler that
 * interrupted the allocator or the library it must not (it hung), and
 * the registration then fails with EBUSY. So the program must end; a
 * register may succeed, or fail with EBUSY (managed, not handed over) or
 * EINVAL (the handler saw a block realloc was moving). Exit 0 with the
 * counts if so; 1 on any other error. Arguments: seconds, and "big" for
 * large blocks only. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

static int uffd;
static char *volatile cur;  // the current managed block (8 MiB), or NULL
static volatile unsigned long next_page;
static volatile long ok, busy, moved, other, sigs;

static void on_alarm(int sig) {
    (void)sig;
    int saved = errno;
    sigs++;
    char *b = cur;
    if (b) {
        unsigned long pg = next_page++ % 2040;
        unsigned long base = ((unsigned long)b + 4095) & ~4095UL;
        struct uffdio_register reg = {
            .range = {.start = base + pg * 4096, .len = 4096},
            .mode = UFFDIO_REGISTER_MODE_MISSING,
        };
        if (ioctl(uffd, UFFDIO_REGISTER, &reg) == 0) {
            ok++;
            struct uffdio_range r = reg.range;
            ioctl(uffd, UFFDIO_UNREGISTER, &r);
        } else if (errno == EBUSY) {
            busy++;
        } else if (errno == EINVAL) {
            moved++;
        } else {
            other++;
        }
    }
    errno = saved;
}

int main(int argc, char **argv) {
    int seconds = argc > 1 ? atoi(argv[1]) : 3;
    int big_only = argc > 2 && strcmp(argv[2], "big") == 0;  // no glibc blocks
    uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0) { perror("userfaultfd"); return 2; }
    struct uffdio_api api = {.api = UFFD_API};
    if (ioctl(uffd, UFFDIO_API, &api)) { perror("UFFDIO_API"); return 2; }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {.it_interval = {0, 200}, .it_value = {0, 200}};
    struct timeval t0, t;
    gettimeofday(&t0, NULL);
    unsigned long rounds = 0;
    void *small[64] = {0};
    setitimer(ITIMER_REAL, &it, NULL);
    do {
        char *b = malloc(8 << 20);
        if (!b) return 3;
        memset(b, 1, 8 << 20);
        cur = b;
        for (int i = 0; i < 2000; i++) {
            int k = i % 64;
            if (big_only) {
                if (i % 100 == 0) { free(small[k % 4]); small[k % 4] = malloc(2 << 20); }
                char *c = realloc(b, (8 << 20) + 4096 * (i % 7));
                if (c) { b = c; cur = b; }
                continue;
            }
            free(small[k]);
            small[k] = malloc(2000 + (i * 7919) % 60000);  // glibc, not tcache
            if (i % 500 == 0) {
                char *c = realloc(b, (8 << 20) + 4096 * (i / 500 + 1));
                if (c) { b = c; cur = b; }
            }
        }
        cur = NULL;
        free(b);
        rounds++;
        gettimeofday(&t, NULL);
    } while (t.tv_sec - t0.tv_sec < seconds);
    struct itimerval off = {0};
    setitimer(ITIMER_REAL, &off, NULL);
    printf("rounds %lu signals %ld registered %ld EBUSY %ld EINVAL %ld other %ld\n", rounds,
           sigs, ok, busy, moved, other);
    if (other) {
        printf("FAIL %ld registers failed otherwise\n", other);
        return 1;
    }
    return 0;
}
