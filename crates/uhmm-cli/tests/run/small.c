/* A small program with a large malloc block: prints a checksum of what
 * it wrote there. Built static, and copied setuid, to see that uhmm run
 * leaves such programs alone (the dynamic linker ignores LD_PRELOAD for
 * them) and says so once. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    size_t n = 4u << 20;
    unsigned char *p = malloc(n);
    if (!p)
        return 1;
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(i * 7 + (i >> 12));
    uint64_t sum = 0;
    for (size_t i = 0; i < n; i += 61)
        sum = sum * 31 + p[i];
    free(p);
    printf("small %016llx\n", (unsigned long long)sum);
    return 0;
}
