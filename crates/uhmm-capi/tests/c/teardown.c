/* uhmm calls while the calling thread's thread-locals are being destroyed:
 * from an atexit handler, from a pthread_key destructor, and a notifier's
 * callback getting UHMM_EVENT_RELEASE as the process exits. Each must
 * answer as at any other time; before, each aborted the process (a panic
 * out of an extern "C" function: Rust's thread-locals were gone).
 *
 *   teardown atexit | key | release
 *
 * Prints "teardown: <mode> ok" last when every call answered 0. */
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "uhmm.h"

static uhmm_mm *mm;
static uhmm_region *region;
static int failures;

static void check(const char *what, int rc)
{
    if (rc != 0) {
        fprintf(stderr, "teardown: %s -> %d (%s)\n", what, rc, uhmm_last_error());
        failures++;
    }
}

static void at_exit_free(void)
{
    check("uhmm_region_free in atexit", uhmm_region_free(region));
    check("uhmm_mm_destroy in atexit", uhmm_mm_destroy(mm));
    /* (uhmm_last_error after a good call: empty.) */
    if (uhmm_last_error()[0] != '\0') {
        fprintf(stderr, "teardown: a message after a good call: %s\n", uhmm_last_error());
        failures++;
    }
    if (failures == 0)
        fprintf(stderr, "teardown: atexit ok\n");
    fflush(stderr);
    if (failures)
        _exit(1);
}

static pthread_key_t key;
static int key_rc = -1;

static void free_at_key(void *p)
{
    key_rc = uhmm_region_free((uhmm_region *)p);
}

static void *worker(void *arg)
{
    (void)arg;
    uhmm_region *r;
    if (uhmm_region_alloc(mm, 4 * UHMM_PAGE_SIZE, UHMM_BACKING_ANON_PRIVATE, &r) != 0)
        return NULL;
    ((volatile char *)uhmm_region_addr(r))[0] = 1;
    pthread_setspecific(key, r);
    return NULL;
}

static volatile int released = -1;

static bool invalidate(void *ctx, const uhmm_subscription *sub,
                       const uhmm_notifier_range *r, uint64_t seq)
{
    (void)ctx;
    int rc = uhmm_subscription_set_seq(sub, seq);
    if (r->event == UHMM_EVENT_RELEASE) {
        released = rc;
        char buf[64];
        int n = snprintf(buf, sizeof buf, "teardown: release %s\n",
                         rc == 0 ? "ok" : "set_seq failed");
        if (write(2, buf, (size_t)n) < 0)
            return true;
    }
    return true;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    check("uhmm_mm_create", uhmm_mm_create(&mm));
    if (failures)
        return 1;
    if (strcmp(mode, "atexit") == 0) {
        check("uhmm_region_alloc",
              uhmm_region_alloc(mm, 16 * UHMM_PAGE_SIZE, UHMM_BACKING_ANON_PRIVATE, &region));
        atexit(at_exit_free);
        return failures;
    }
    if (strcmp(mode, "key") == 0) {
        pthread_key_create(&key, free_at_key);
        pthread_t t;
        pthread_create(&t, NULL, worker, NULL);
        pthread_join(t, NULL);
        check("uhmm_region_free in a pthread_key destructor", key_rc);
        check("uhmm_mm_destroy", uhmm_mm_destroy(mm));
        if (failures == 0)
            fprintf(stderr, "teardown: key ok\n");
        return failures;
    }
    if (strcmp(mode, "release") == 0) {
        uhmm_notifier *n;
        check("uhmm_region_alloc",
              uhmm_region_alloc(mm, 4 * UHMM_PAGE_SIZE, UHMM_BACKING_ANON_PRIVATE, &region));
        char *p = uhmm_region_addr(region);
        memset(p, 1, 4 * UHMM_PAGE_SIZE);
        check("uhmm_notifier_insert",
              uhmm_notifier_insert(mm, (uintptr_t)p, 4 * UHMM_PAGE_SIZE, invalidate, NULL, &n));
        /* An invalidation on this thread first (its callback runs here). */
        size_t count = 0;
        check("uhmm_mm_make_device_exclusive",
              uhmm_mm_make_device_exclusive(mm, (uintptr_t)p, UHMM_PAGE_SIZE,
                                            uhmm_owner_unique(), &count));
        p[0] = 2; /* the CPU takes the page back */
        /* The handles stay live: the process exit releases them. */
        return failures;
    }
    fprintf(stderr, "usage: teardown atexit|key|release\n");
    return 2;
}
