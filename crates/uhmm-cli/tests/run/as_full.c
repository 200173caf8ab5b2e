/* A program that fills its address space: it lowers RLIMIT_AS to LIMIT
 * MiB (argv[1]), allocates blocks of SIZE bytes (argv[2]) until malloc
 * says no, then small blocks until malloc says no, and then, with nothing
 * left, frees and allocates large blocks again, writing each. It handles
 * every NULL, as a program should, and checks every block's contents at
 * the end. The output (no counts: they differ under uhmm, whose own
 * mappings count against the limit too) must be the same plain and under
 * `uhmm run`. Before uhmm's own allocations had a pool of their own, the
 * next one after the program filled the limit aborted it ("memory
 * allocation of 96 bytes failed"). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#define MIB (1UL << 20)
#define MAX_BLOCKS 4096
#define MAX_SMALL (1 << 22)

static unsigned char tag(size_t i, int round) { return (unsigned char)((i * 31 + (size_t)round) | 1); }

int main(int argc, char **argv) {
    if (argc < 3)
        return 2;
    size_t limit = strtoul(argv[1], NULL, 0) * MIB, size = strtoul(argv[2], NULL, 0);
    struct rlimit r = {limit, limit};
    if (setrlimit(RLIMIT_AS, &r)) {
        perror("setrlimit");
        return 2;
    }
    static unsigned char *big[MAX_BLOCKS];
    static int round_of[MAX_BLOCKS];
    size_t n = 0;
    while (n < MAX_BLOCKS && (big[n] = malloc(size)) != NULL) {
        memset(big[n], tag(n, 0), size);
        n++;
    }
    static void *small[MAX_SMALL];
    size_t m = 0;
    while (m < MAX_SMALL && (small[m] = malloc(32)) != NULL)
        m++;
    printf("filled: %s large, %s small\n", n ? "some" : "no", m ? "some" : "no");
    /* Nothing left: churn the large blocks (each new one is managed
     * afresh under uhmm, which allocates for it). */
    size_t lost = 0;
    for (int round = 1; n && round <= 300; round++) {
        size_t i = (size_t)round * 7 % n;
        free(big[i]);
        big[i] = malloc(size);
        if (!big[i]) {
            lost++;
            continue;
        }
        memset(big[i], tag(i, round), size);
        round_of[i] = round;
        if (round % 50 == 0)
            usleep(2000);
    }
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (!big[i])
            continue;
        unsigned char want = tag(i, round_of[i]);
        for (size_t o = 0; o < size; o += 4096)
            bad += big[i][o] != want;
        bad += big[i][size - 1] != want;
    }
    for (size_t i = 0; i < m; i++)
        free(small[i]);
    for (size_t i = 0; i < n; i++)
        free(big[i]);
    /* Room again: a large block works. */
    unsigned char *again = malloc(size);
    if (again)
        memset(again, 0x5a, size);
    printf("blocks %s, %s after freeing\n", bad ? "CORRUPT" : "intact", again ? "malloc works" : "malloc FAILS");
    fprintf(stderr, "%zu large, %zu small, %zu not given again, %zu bad bytes\n", n, m, lost, bad);
    free(again);
    return bad != 0;
}
