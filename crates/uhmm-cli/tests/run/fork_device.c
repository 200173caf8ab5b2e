/* A fork with many managed pages on the device: uhmm's fork hook brings
 * them all home on the forking thread, allocating as it goes (a large
 * list of pages). Under `uhmm run --chaos` the program waits until most
 * of its 128 MiB mapping is off the CPU page table (read from
 * /proc/self/pagemap: not present) before it forks. The child and the
 * parent print a checksum of the data; exit status 1 on a wrong value. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LEN (128UL << 20)
#define PAGES (LEN / 4096)

static uint64_t pm[PAGES];

static uint64_t sum(const uint64_t *p, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++)
        s = s * 1000003 + p[i];
    return s;
}

/* Pages of [p, p + LEN) not in the CPU page table. */
static size_t away(const void *p) {
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0)
        return 0;
    off_t off = (off_t)((uintptr_t)p / 4096 * 8);
    ssize_t got = pread(fd, pm, sizeof pm, off);
    close(fd);
    size_t n = 0;
    for (ssize_t i = 0; i < got / 8; i++)
        n += !(pm[i] >> 63);
    return n;
}

int main(int argc, char **argv) {
    size_t want = argc > 1 ? strtoul(argv[1], NULL, 10) : 0;
    size_t n = LEN / 8;
    uint64_t *a = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED)
        return 1;
    for (size_t i = 0; i < n; i++)
        a[i] = i * 2654435761u + 7;
    uint64_t expect = sum(a, n);
    if (getenv("UHMM_RUN_CHAOS") && want) {
        struct timespec t = {0, 20 * 1000000L};
        for (int i = 0; i < 1000 && away(a) < want; i++)
            nanosleep(&t, NULL);
        fprintf(stderr, "fork_device: %zu pages away at the fork\n", away(a));
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        return 1;
    if (pid == 0) {
        uint64_t s = sum(a, n);
        /* A managed block of the child's own (its own Mm). */
        uint64_t *b = malloc(LEN / 16);
        memcpy(b, a, LEN / 16);
        if (sum(b, LEN / 128) != sum(a, LEN / 128))
            s = 0;
        free(b);
        printf("child %s %llu\n", s == expect ? "ok" : "BAD", (unsigned long long)s);
        fflush(stdout);
        exit(s == expect ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    uint64_t s = sum(a, n);
    printf("parent %s %llu\n", s == expect ? "ok" : "BAD", (unsigned long long)s);
    return s == expect && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
