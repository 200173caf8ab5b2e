/* mremap of a managed mapping made of several pieces: a mapping grown by
 * mremap is the original piece and its grown tail; it is grown again, its
 * head unmapped, grown again (three pieces), split by mprotect and joined
 * again, and grown a last time. Every step writes the new part and checks
 * all of it, after a pause that lets `uhmm run --chaos` move pages away.
 * Prints a checksum per step; exit status 1 on a wrong value. The mapping
 * is left mapped at exit (`uhmm run` reports what is managed then). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>

#define MIB (1UL << 20)

/* The mapping: `words` words from `base`, whose first is word `first` of
 * the original mapping (unmapping the head keeps the numbers). */
static uint64_t *base;
static size_t first, words;

static void pause_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static uint64_t value(size_t i) {
    return i * 2654435761u + 17;
}

/* Writes words [from, to) (numbered from the original start). */
static void fill(size_t from, size_t to) {
    for (size_t i = from; i < to; i++)
        base[i - first] = value(i);
}

static int check(const char *step) {
    pause_ms(100);
    uint64_t s = 0;
    for (size_t i = first; i < first + words; i++) {
        if (base[i - first] != value(i)) {
            printf("%s: word %zu is %llx\n", step, i, (unsigned long long)base[i - first]);
            return 1;
        }
        s = s * 1000003 + base[i - first];
    }
    printf("%s %zu MiB %llx\n", step, words * 8 / MIB, (unsigned long long)s);
    return 0;
}

/* Grows the mapping to `mib` MiB (it may move) and fills the new part. */
static int grow(const char *step, size_t mib) {
    void *p = mremap(base, words * 8, mib * MIB, MREMAP_MAYMOVE);
    if (p == MAP_FAILED) {
        perror("mremap");
        return 1;
    }
    base = p;
    size_t old = words;
    words = mib * MIB / 8;
    fill(first + old, first + words);
    return check(step);
}

int main(void) {
    int bad = 0;
    words = 8 * MIB / 8;
    base = mmap(NULL, 8 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return 2;
    fill(0, words);
    bad |= check("mapped");
    /* One piece and its grown tail. */
    bad |= grow("grown", 16);
    /* Two pieces, grown. */
    bad |= grow("grown again", 24);
    /* The head unmapped: the rest starts inside the first piece. */
    if (munmap(base, 4 * MIB))
        return 2;
    base += 4 * MIB / 8;
    first = 4 * MIB / 8;
    words -= first;
    bad |= check("head unmapped");
    bad |= grow("grown after munmap", 32);
    /* Split by mprotect (three mappings), joined again by the reverse. */
    if (mprotect((char *)base + 6 * MIB, 4 * MIB, PROT_READ) ||
        mprotect((char *)base + 6 * MIB, 4 * MIB, PROT_READ | PROT_WRITE))
        return 2;
    bad |= check("mprotect round trip");
    bad |= grow("grown after mprotect", 40);
    /* Shrunk across two pieces: what stays is right. */
    void *p = mremap(base, words * 8, 26 * MIB, 0);
    if (p == MAP_FAILED)
        return 2;
    words = 26 * MIB / 8;
    bad |= check("shrunk");
    return bad;
}
