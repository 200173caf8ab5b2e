/* A program that lowers RLIMIT_AS below what it has mapped (allowed: only
 * later mappings fail) to LIMIT MiB (argv[1]), after it made 16 large
 * blocks; then fills glibc's heap with small blocks until malloc says no,
 * and goes on working on its large blocks (touching them, freeing and
 * asking for them again, which fails), three rounds, setting the limit
 * each time. It handles every NULL. Under `uhmm run` the library's own
 * pool must keep room for what it does for memory it manages already
 * (a freed block's bookkeeping, chaos): cut to what it held, it aborted
 * the program ("memory allocation of 96 bytes failed"). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#define MIB (1UL << 20)
#define N 16

int main(int argc, char **argv) {
    size_t limit = (argc > 1 ? strtoul(argv[1], NULL, 0) : 16) * MIB;
    unsigned char *b[N];
    for (int i = 0; i < N; i++) {
        b[i] = malloc(4 * MIB);
        if (b[i])
            memset(b[i], 1, 4 * MIB);
    }
    for (int round = 0; round < 3; round++) {
        struct rlimit r = {limit, RLIM_INFINITY};
        if (setrlimit(RLIMIT_AS, &r)) {
            perror("setrlimit");
            return 2;
        }
        size_t again = 0, small = 0;
        while (malloc(64))
            small++;
        for (int k = 0; k < 200; k++) {
            int i = k % N;
            if (k % 7 == 0) {
                free(b[i]);
                b[i] = malloc(4 * MIB);
                if (b[i]) {
                    memset(b[i], 2, 4 * MIB);
                    again++;
                }
            } else if (b[i]) {
                b[i][(size_t)k * 4096 % (4 * MIB)]++;
            }
        }
        fprintf(stderr, "round %d: %zu small, %zu large again\n", round, small, again);
    }
    for (int i = 0; i < N; i++)
        free(b[i]);
    printf("done\n");
    return 0;
}
