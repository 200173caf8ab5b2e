/* A sampling profiler's pattern: a SIGALRM handler every 50 us appends
 * samples to a large malloc'd buffer it has not touched yet (one new page
 * every 8 signals), while the program maps and unmaps large buffers.
 * Under uhmm run the buffer is managed and its first touches are served
 * by uhmm; each mmap is managed on the program's thread, under uhmm's
 * lock. A handler that ran there waited for the fault service, which
 * waited for that lock: the program hung. Prints the samples taken. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <unistd.h>

static uint64_t *samples;
static const size_t cap = (256 << 20) / 8;
static volatile size_t next;

static void on_tick(int sig)
{
    (void)sig;
    if (next < cap) {
        samples[next] = next;
        next += 64;
    }
}

int main(void)
{
    samples = malloc(cap * 8);
    if (!samples)
        return 1;
    signal(SIGALRM, on_tick);
    struct itimerval it = {{0, 50}, {0, 50}};
    setitimer(ITIMER_REAL, &it, NULL);
    for (int k = 0; k < 3000; k++) {
        size_t len = (size_t)(2 + k % 7) << 20;
        char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return 1;
        p[0] = 1;
        munmap(p, len);
    }
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    size_t taken = next / 64;
    for (size_t i = 0; i < taken; i++)
        if (samples[i * 64] != i * 64)
            return 2;
    printf("done: %s\n", taken > 0 ? "samples taken" : "no sample");
    return 0;
}
