/* A library for LD_PRELOAD after uhmm's (`LD_PRELOAD=slow_mmap.so uhmm
 * run -- PROGRAM` puts it there): its `mmap` is the one uhmm's library
 * calls as the real one. Once armed (slow_mmap_arm, found by the program
 * with dlsym), the next MAP_FIXED read-write mapping, which is uhmm's
 * library mapping memory for a malloc block, sleeps first, with whatever
 * locks the caller holds: a test holds a window open that is otherwise a
 * few microseconds wide. Unarmed it only passes calls on. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <time.h>

static atomic_int armed_ms;
static atomic_int entered;

void slow_mmap_arm(int ms) {
    atomic_store(&entered, 0);
    atomic_store(&armed_ms, ms);
}

/* Whether the armed call has started (and is sleeping, or done). */
int slow_mmap_entered(void) {
    return atomic_load(&entered);
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    static void *(*next)(void *, size_t, int, int, int, off_t);
    if (!next)
        next = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(RTLD_NEXT, "mmap");
    if ((flags & MAP_FIXED) && prot == (PROT_READ | PROT_WRITE)) {
        int ms = atomic_exchange(&armed_ms, 0);
        if (ms > 0) {
            atomic_store(&entered, 1);
            struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
            nanosleep(&t, NULL);
        }
    }
    return next(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    return mmap(addr, len, prot, flags, fd, off);
}
