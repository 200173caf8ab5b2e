/* RLIMIT_AS lowered from outside: a child prlimits its parent to 1 GiB
 * (far above what the parent needs), which no call of the parent sees.
 * uhmm's reservation (256 GiB without a limit) must be cut before the
 * parent runs out of room it has plain.
 *
 * argv[1] = thread, calloc, realloc or memalign: after the lowering, the
 * parent's first call is that one (glibc maps a thread's stack, and large
 * calloc/realloc/posix_memalign blocks, itself). "race": eight threads
 * map, unmap, malloc and free in a loop while the child lowers the limit;
 * the first thread to see it cuts the reservation, and none may fail
 * meanwhile. Prints "<mode> ok" plain; anything else is a failure. */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#define MIB (1UL << 20)
#define THREADS 8

static atomic_int stop;
static atomic_long failures;

static void *idle(void *a) { return a; }

static void *churn(void *arg) {
    size_t len = ((long)arg % 2) ? 8 * MIB : 2 * MIB;
    while (!atomic_load(&stop)) {
        char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            atomic_fetch_add(&failures, 1);
        } else {
            m[0] = 1;
            munmap(m, len);
        }
        char *p = malloc(512 * 1024);
        if (!p) {
            atomic_fetch_add(&failures, 1);
        } else {
            p[0] = 1;
            free(p);
        }
    }
    return NULL;
}

/* Forks a child that lowers this process's limit; waits for it. */
static int lowered_from_outside(void) {
    pid_t parent = getpid(), child = fork();
    if (child < 0)
        return -1;
    if (child == 0) {
        struct rlimit l = {1024 * MIB, RLIM_INFINITY};
        _exit(prlimit(parent, RLIMIT_AS, &l, NULL) ? 3 : 0);
    }
    int st;
    return waitpid(child, &st, 0) == child && WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "race";
    int ok;
    mallopt(M_MMAP_THRESHOLD, 128 * 1024); /* glibc maps 512 KiB blocks itself */
    if (!strcmp(mode, "race")) {
        /* Freed blocks kept by uhmm for reuse: the cut has work to do. */
        void *b[8];
        for (int i = 0; i < 8; i++)
            if ((b[i] = malloc(16 * MIB)))
                memset(b[i], 1, 16 * MIB);
        for (int i = 0; i < 8; i++)
            free(b[i]);
        pthread_t t[THREADS];
        for (long i = 0; i < THREADS; i++)
            pthread_create(&t[i], NULL, churn, (void *)i);
        usleep(50000);
        ok = lowered_from_outside() == 0;
        usleep(200000);
        atomic_store(&stop, 1);
        for (int i = 0; i < THREADS; i++)
            pthread_join(t[i], NULL);
        if (failures)
            fprintf(stderr, "%ld calls failed\n", (long)failures);
        ok = ok && failures == 0;
    } else {
        char *small = malloc(1000);
        if (lowered_from_outside())
            return 2;
        if (!strcmp(mode, "thread")) {
            pthread_t t;
            ok = pthread_create(&t, NULL, idle, NULL) == 0;
            if (ok)
                pthread_join(t, NULL);
        } else if (!strcmp(mode, "calloc")) {
            ok = calloc(1, 512 * 1024) != NULL;
        } else if (!strcmp(mode, "realloc")) {
            ok = realloc(small, 512 * 1024) != NULL;
        } else {
            void *p = NULL;
            ok = posix_memalign(&p, 4096, 512 * 1024) == 0;
        }
    }
    printf("%s %s\n", mode, ok ? "ok" : "FAILED");
    return 0;
}
