/* Bad input for `uhmm run`: a program that unmaps half of a large
 * mapping, grows it with mremap, discards part of it, forks with its
 * pages (on the device, under --chaos), grows and shrinks malloc blocks,
 * maps more than a small device holds, and exits from a signal handler.
 * Every step prints a checksum of what it reads; the output must be the
 * same plain and under `uhmm run --chaos`. Exit status 1 on a wrong value. */
#define _GNU_SOURCE
#include <malloc.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MIB (1UL << 20)

static uint64_t sum(const uint64_t *p, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++)
        s = s * 1000003 + p[i];
    return s;
}

static void fill(uint64_t *p, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; i++)
        p[i] = i * 2654435761u + seed;
}

/* Lets chaos move pages away: touch nothing for a while. */
static void pause_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static int check(const char *what, const uint64_t *p, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != i * 2654435761u + seed) {
            printf("%s: word %zu is %llu\n", what, i, (unsigned long long)p[i]);
            return 1;
        }
    return 0;
}

static volatile uint64_t *spin;
static volatile size_t spin_n;

static void on_alarm(int sig) {
    (void)sig;
    printf("signal exit\n");
    fflush(stdout);
    exit(0); /* atexit handlers run from the handler */
}

int main(void) {
    int bad = 0;
    size_t len = 64 * MIB, n = len / 8;
    uint64_t *a = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED)
        return 2;
    fill(a, n, 1);
    pause_ms(300);
    printf("mapped %llx\n", (unsigned long long)sum(a, n));

    /* Unmap the second half; the first must read as written. */
    if (munmap((char *)a + len / 2, len / 2))
        return 2;
    pause_ms(200);
    bad |= check("after munmap", a, n / 2, 1);
    printf("half %llx\n", (unsigned long long)sum(a, n / 2));

    /* Grow it back (it may move), write the new part. */
    a = mremap(a, len / 2, len + 16 * MIB, MREMAP_MAYMOVE);
    if (a == MAP_FAILED)
        return 2;
    size_t n2 = (len + 16 * MIB) / 8;
    bad |= check("after mremap", a, n / 2, 1);
    for (size_t i = n / 2; i < n2; i++)
        if (a[i] != 0) {
            printf("grown part not zero at %zu\n", i);
            bad = 1;
            break;
        }
    fill(a + n / 2, n2 - n / 2, 5);
    pause_ms(300);
    printf("grown %llx\n", (unsigned long long)sum(a, n2));

    /* Discard a middle part: zeros. */
    if (madvise((char *)a + 8 * MIB, 8 * MIB, MADV_DONTNEED))
        return 2;
    for (size_t i = MIB; i < 2 * MIB; i++)
        if (a[i] != 0) {
            printf("discarded word %zu is not zero\n", i);
            bad = 1;
            break;
        }
    printf("discarded %llx\n", (unsigned long long)sum(a, n2));

    /* Fork with pages on the device: the child sees the data. */
    pause_ms(300);
    uint64_t before = sum(a, n2);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        uint64_t s = sum(a, n2);
        uint64_t *c = malloc(32 * MIB); /* the child's own, managed anew */
        fill(c, 4 * MIB, 9);
        pause_ms(200);
        int cb = check("child malloc", c, 4 * MIB, 9);
        printf("child %s %llx\n", s == before ? "same" : "DIFFERENT", (unsigned long long)s);
        fflush(stdout);
        exit(cb || s != before);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        bad = 1;
    a[3] = 7;
    printf("parent after fork %llx\n", (unsigned long long)sum(a, n2));

    /* malloc blocks grown and shrunk. */
    uint64_t *m = malloc(16 * MIB);
    fill(m, 2 * MIB, 3);
    pause_ms(200);
    m = realloc(m, 48 * MIB);
    bad |= check("realloc grow", m, 2 * MIB, 3);
    fill(m, 6 * MIB, 4);
    uint64_t *m2 = calloc(6 * MIB, 8);
    for (size_t i = 0; i < 6 * MIB; i++)
        if (m2[i]) {
            printf("calloc not zero\n");
            bad = 1;
            break;
        }
    pause_ms(200);
    m = realloc(m, 8 * MIB);
    bad |= check("realloc shrink", m, MIB, 4);
    printf("malloc %llx %d\n", (unsigned long long)sum(m, MIB), malloc_usable_size(m) >= 8 * MIB);
    free(m);
    free(m2);

    /* More than a small device holds (uhmm run --device-memory). */
    size_t big = 96 * MIB;
    uint64_t *b = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    fill(b, big / 8, 11);
    pause_ms(400);
    bad |= check("big", b, big / 8, 11);
    printf("big %llx\n", (unsigned long long)sum(b, big / 8));
    munmap(b, big);
    munmap(a, n2 * 8);

    if (bad)
        return 1;
    /* Exit from a signal handler while reading managed memory. */
    spin_n = 4 * MIB;
    spin = malloc(spin_n * 8);
    fill((uint64_t *)spin, spin_n, 2);
    signal(SIGALRM, on_alarm);
    alarm(1);
    for (;;)
        for (size_t i = 0; i < spin_n; i++)
            if (spin[i] != i * 2654435761u + 2) {
                printf("spin word %zu\n", i);
                return 1;
            }
}
