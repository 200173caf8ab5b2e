/* Large blocks allocated, written and freed in a loop, and large blocks
 * shrunk by realloc: the memory freed must go back to the system. The
 * program reads its resident memory (/proc/self/statm) after each round
 * and fails (exit status 1) if more than BOUND_MIB stays resident beyond
 * what it holds (not checked with the argument "any": under chaos the
 * device's memory is the process's too). glibc is told to unmap every
 * block of 1 MiB or more at once (mallopt), so that plain runs keep
 * nothing either. calloc after the frees must give zeros. Prints the
 * checksums of what it wrote and whether the bound held. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MIB (1UL << 20)
#define BOUND_MIB 32

static long resident_mib(void) {
    long size = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f || fscanf(f, "%ld %ld", &size, &resident) != 2)
        resident = -1;
    if (f)
        fclose(f);
    return resident * 4096 / (long)MIB;
}

static uint64_t fill(uint64_t *p, size_t bytes, uint64_t seed) {
    uint64_t s = 0;
    for (size_t i = 0; i < bytes / 8; i++) {
        p[i] = i * 2654435761u + seed;
        s = s * 1000003 + p[i];
    }
    return s;
}

int main(int argc, char **argv) {
    long bound = argc > 1 && strcmp(argv[1], "any") == 0 ? 1L << 40 : BOUND_MIB;
    mallopt(M_MMAP_THRESHOLD, MIB);
    mallopt(M_TRIM_THRESHOLD, MIB);
    /* The first large block starts uhmm in the process: not counted. */
    free(malloc(2 * MIB));
    long base = resident_mib(), worst = 0;
    uint64_t s = 0;
    /* Allocated, written, freed: sizes from 2 to 30 MiB, several at once. */
    for (int round = 0; round < 8; round++) {
        uint64_t *b[3];
        for (int i = 0; i < 3; i++) {
            size_t len = (size_t)(2 + (round * 7 + i * 5) % 29) * MIB;
            b[i] = malloc(len);
            if (!b[i])
                return 2;
            s ^= fill(b[i], len, round * 3 + i);
        }
        for (int i = 0; i < 3; i++)
            free(b[i]);
        long kept = resident_mib() - base;
        if (kept > worst)
            worst = kept;
    }
    printf("freed %llx %s\n", (unsigned long long)s, worst <= bound ? "given back" : "KEPT");
    if (worst > bound)
        fprintf(stderr, "%ld MiB stayed resident after frees\n", worst);
    /* Shrunk: 6 blocks of 16 MiB written, each cut to 1 MiB. */
    uint64_t *k[6];
    s = 0;
    for (int i = 0; i < 6; i++) {
        k[i] = malloc(16 * MIB);
        if (!k[i])
            return 2;
        s ^= fill(k[i], 16 * MIB, i);
        uint64_t *q = realloc(k[i], MIB);
        if (!q)
            return 2;
        k[i] = q;
    }
    long kept = resident_mib() - base - 6; /* what the 6 blocks hold now */
    for (int i = 0; i < 6; i++) {
        for (size_t j = 0; j < MIB / 8; j++)
            if (k[i][j] != j * 2654435761u + i) {
                printf("shrunk block %d: word %zu is wrong\n", i, j);
                return 1;
            }
        free(k[i]);
    }
    printf("shrunk %llx %s\n", (unsigned long long)s, kept <= bound ? "given back" : "KEPT");
    if (kept > bound)
        fprintf(stderr, "%ld MiB stayed resident after shrinking\n", kept);
    /* Blocks of the sizes freed above, zeroed. */
    int zeros = 1;
    for (int i = 0; i < 4; i++) {
        size_t len = (size_t)(4 + i * 7) * MIB;
        uint64_t *z = calloc(len / 8, 8);
        if (!z)
            return 2;
        for (size_t j = 0; j < len / 8; j += 61)
            zeros &= z[j] == 0;
        s ^= fill(z, len, 100 + i);
        free(z);
    }
    printf("calloc %s %llx\n", zeros ? "zeroed" : "NOT ZEROED", (unsigned long long)s);
    return worst > bound || kept > bound || !zeros;
}
