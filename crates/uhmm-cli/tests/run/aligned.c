/* The aligned allocators and malloc, large and small, with whatever
 * malloc serves the program (glibc's, or one in LD_PRELOAD after uhmm's
 * library): every block is freed with free() and must be the allocator's
 * own. Prints a checksum of what it wrote. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t fill(void *p, size_t n, int seed) {
    memset(p, seed, n);
    uint64_t s = 0;
    for (size_t i = 0; i < n; i += 4096)
        s = s * 31 + ((unsigned char *)p)[i];
    return s + n;
}

int main(void) {
    uint64_t s = 0;
    size_t sizes[] = {64, 100032, 4 << 20};
    for (int k = 0; k < 3; k++) {
        size_t n = sizes[k];
        void *p = NULL;
        if (posix_memalign(&p, 4096, n))
            return 1;
        s += fill(p, n, 1);
        free(p);
        p = aligned_alloc(64, n);
        s += fill(p, n, 2);
        free(p);
        p = memalign(256, n);
        s += fill(p, n, 3);
        free(p);
        p = valloc(n);
        s += fill(p, n, 4);
        free(p);
        p = malloc(n);
        s += fill(p, n, 5);
        p = realloc(p, 2 * n);
        s += fill(p, 2 * n, 6) + (malloc_usable_size(p) >= 2 * n);
        free(p);
        p = calloc(n, 2);
        s += fill(p, n, 7);
        free(p);
    }
    printf("%llu\n", (unsigned long long)s);
    return 0;
}
