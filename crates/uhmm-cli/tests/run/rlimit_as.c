/* A program under a low RLIMIT_AS: with argument "lower" it lowers the
 * limit itself (to LIMIT_MIB), after it started; with "other" a child of
 * it does, with prlimit on its parent's pid (a limit set from outside,
 * which no call of the program sees); without, it runs under the limit
 * it was given (`ulimit -v`). Then it allocates what fits
 * comfortably in the limit (malloc blocks, a mapping, a thread, a grown
 * realloc), checks each, and asks for more than the limit (which must
 * fail). The output must be the same plain and under `uhmm run`. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#define MIB (1UL << 20)
#define LIMIT_MIB 1024UL

static uint64_t fill_sum(uint64_t *p, size_t n, uint64_t seed) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++) {
        p[i] = i * 2654435761u + seed;
        s = s * 1000003 + p[i];
    }
    return s;
}

static uint64_t sum(const uint64_t *p, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++)
        s = s * 1000003 + p[i];
    return s;
}

static void *worker(void *arg) {
    uint64_t *p = malloc(8 * MIB);
    if (!p)
        return NULL;
    uint64_t s = fill_sum(p, MIB / 4, (uintptr_t)arg);
    free(p);
    return (void *)(uintptr_t)(s | 1);
}

int main(int argc, char **argv) {
    struct rlimit r;
    if (argc > 1 && strcmp(argv[1], "lower") == 0) {
        r.rlim_cur = r.rlim_max = LIMIT_MIB * MIB;
        if (setrlimit(RLIMIT_AS, &r)) {
            perror("setrlimit");
            return 2;
        }
    }
    if (argc > 1 && strcmp(argv[1], "other") == 0) {
        pid_t parent = getpid(), child = fork();
        if (child < 0) {
            perror("fork");
            return 2;
        }
        if (child == 0) {
            struct rlimit l = {LIMIT_MIB * MIB, LIMIT_MIB * MIB};
            _exit(prlimit(parent, RLIMIT_AS, &l, NULL) ? 3 : 0);
        }
        int st;
        if (waitpid(child, &st, 0) != child || !WIFEXITED(st) || WEXITSTATUS(st)) {
            fprintf(stderr, "prlimit from the child failed\n");
            return 2;
        }
    }
    getrlimit(RLIMIT_AS, &r);
    printf("limit %s\n", r.rlim_cur == RLIM_INFINITY ? "none" : r.rlim_cur <= LIMIT_MIB * MIB ? "low" : "high");

    /* Small blocks (glibc's heap). */
    void *small[64];
    int small_ok = 0;
    for (int i = 0; i < 64; i++)
        small_ok += (small[i] = malloc(1024 << (i % 7))) != NULL;
    printf("small %d\n", small_ok);

    /* Large blocks: 6 x 32 MiB. */
    uint64_t *big[6];
    for (int i = 0; i < 6; i++) {
        big[i] = malloc(32 * MIB);
        printf("block %d %s", i, big[i] ? "ok" : "failed\n");
        if (big[i])
            printf(" %llx\n", (unsigned long long)fill_sum(big[i], MIB / 4, i));
    }
    /* A mapping. */
    uint64_t *m = mmap(NULL, 64 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    printf("mmap %s", m != MAP_FAILED ? "ok" : "failed\n");
    if (m != MAP_FAILED)
        printf(" %llx\n", (unsigned long long)fill_sum(m, MIB / 4, 7));
    /* A thread. */
    pthread_t t;
    void *res = NULL;
    int trc = pthread_create(&t, NULL, worker, (void *)3);
    if (trc == 0)
        pthread_join(t, &res);
    printf("thread %s %llx\n", trc == 0 ? "ok" : "failed", (unsigned long long)(uintptr_t)res);
    /* A grown realloc. */
    if (big[0]) {
        uint64_t before = sum(big[0], MIB / 4);
        uint64_t *g = realloc(big[0], 96 * MIB);
        printf("realloc %s", g ? "ok" : "failed\n");
        if (g) {
            printf(" %d %llx\n", sum(g, MIB / 4) == before,
                   (unsigned long long)fill_sum(g + 4 * MIB, MIB / 4, 9));
            big[0] = g;
        }
    }
    /* More than the limit: refused, plain and managed alike. */
    void *huge = malloc(2 * LIMIT_MIB * MIB);
    printf("huge %s\n", huge ? "allocated" : "refused");
    free(huge);
    for (int i = 0; i < 6; i++)
        free(big[i]);
    for (int i = 0; i < 64; i++)
        free(small[i]);
    if (m != MAP_FAILED)
        munmap(m, 64 * MIB);
    /* After the frees, the same again fits. */
    uint64_t *again = malloc(128 * MIB);
    printf("again %s\n", again ? "ok" : "failed");
    free(again);
    return 0;
}
