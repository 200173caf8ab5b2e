/*
 * Error paths of the C ABI: NULL pointers, bad handles (NULL, stale, of
 * another kind, made up), bad sizes and flags, destroys inside callbacks,
 * and the messages uhmm_last_error gives. Exit 0 only if every check
 * passed. Run by tests/c_programs.rs.
 */
#define _GNU_SOURCE
#include <uhmm.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static int checks, failures;

/* rc must be `want`, and the message must contain `text` (if given). */
static void expect(int rc, int want, const char *text, const char *what)
{
    const char *msg = uhmm_last_error();
    bool ok = rc == want && msg != NULL && (text == NULL || strstr(msg, text) != NULL);
    if (want == 0)
        ok = ok && msg[0] == '\0';
    checks++;
    if (!ok)
        failures++;
    printf("%s %s: rc %d (want %d), \"%s\"\n", ok ? "ok  " : "FAIL", what, rc, want, msg ? msg : "(NULL)");
}

static void check(bool ok, const char *what)
{
    checks++;
    if (!ok)
        failures++;
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}

static int dummy_to_ram(void *ctx, uhmm_fault *f)
{
    (void)ctx;
    (void)f;
    return 0;
}

struct cb_state {
    uhmm_mm *mm;
    uhmm_notifier *own;
    int destroy_rc;
    int read_rc;
    int calls;
    char msg[256];
    char read_msg[256];
};

/* Tries to destroy the address space from inside a callback, and to begin
 * a read of its own notifier there (once the callback has set the
 * sequence, that would wait for this very callback). */
static bool destroying_invalidate(void *ctx, const uhmm_subscription *sub, const uhmm_notifier_range *r,
                                  uint64_t seq)
{
    struct cb_state *s = ctx;
    (void)r;
    if (s->calls++ == 0) {
        s->destroy_rc = uhmm_mm_destroy(s->mm);
        snprintf(s->msg, sizeof s->msg, "%s", uhmm_last_error());
        if (s->own != NULL) {
            uint64_t begun = 0;
            s->read_rc = uhmm_notifier_read_begin(s->own, &begun);
            snprintf(s->read_msg, sizeof s->read_msg, "%s", uhmm_last_error());
        }
    }
    uhmm_subscription_set_seq(sub, seq);
    return true;
}

static bool plain_invalidate(void *ctx, const uhmm_subscription *sub, const uhmm_notifier_range *r,
                             uint64_t seq)
{
    (void)ctx;
    (void)r;
    uhmm_subscription_set_seq(sub, seq);
    return true;
}

int main(void)
{
    uhmm_mm *mm = NULL;
    uhmm_mm_stats st;

    /* NULL out-pointers and handles. */
    expect(uhmm_mm_create(NULL), -EINVAL, "out is NULL", "uhmm_mm_create(NULL)");
    expect(uhmm_mm_create_with_access(7, &mm), -EINVAL, "access policy 7", "a bad access policy");
    expect(uhmm_mm_get_stats(NULL, &st), -EINVAL, "uhmm_mm is NULL", "stats of a NULL uhmm_mm");
    expect(uhmm_mm_create(&mm), 0, NULL, "uhmm_mm_create");
    expect(uhmm_mm_get_stats(mm, NULL), -EINVAL, "out is NULL", "stats into NULL");
    check(uhmm_region_addr(NULL) == NULL && strstr(uhmm_last_error(), "NULL") != NULL,
          "uhmm_region_addr(NULL) is NULL, with a message");
    check(uhmm_region_len(NULL) == 0, "uhmm_region_len(NULL) is 0");
    expect(uhmm_notifier_read_retry(NULL, 0), -EINVAL, "NULL", "read_retry of a NULL notifier");

    /* NULL destroys are no-ops. */
    expect(uhmm_mm_destroy(NULL), 0, NULL, "uhmm_mm_destroy(NULL)");
    expect(uhmm_region_free(NULL), 0, NULL, "uhmm_region_free(NULL)");
    expect(uhmm_notifier_destroy(NULL), 0, NULL, "uhmm_notifier_destroy(NULL)");
    expect(uhmm_pagemap_destroy(NULL), 0, NULL, "uhmm_pagemap_destroy(NULL)");
    expect(uhmm_migrate_finalize(NULL), 0, NULL, "uhmm_migrate_finalize(NULL)");
    expect(uhmm_devmem_free(NULL), 0, NULL, "uhmm_devmem_free(NULL)");

    /* Made-up, wrong-kind and stale handles. */
    expect(uhmm_mm_get_stats((uhmm_mm *)(uintptr_t)0x1000, &st), -EINVAL, "not a live uhmm_mm handle",
           "a made-up uhmm_mm");
    uhmm_region *region = NULL;
    expect(uhmm_region_alloc(mm, 8 * UHMM_PAGE_SIZE, UHMM_BACKING_ANON_PRIVATE, &region), 0, NULL,
           "uhmm_region_alloc");
    expect(uhmm_mm_get_stats((uhmm_mm *)region, &st), -EINVAL, "not a live uhmm_mm handle",
           "a region passed as a uhmm_mm");
    expect(uhmm_mm_destroy((uhmm_mm *)region), -EINVAL, "not a live uhmm_mm", "destroying a region as a uhmm_mm");
    uintptr_t base = (uintptr_t)uhmm_region_addr(region);
    check(base != 0 && uhmm_region_len(region) == 8 * UHMM_PAGE_SIZE, "the region is still there");

    /* Bad sizes and flags. */
    uhmm_region *r2 = NULL;
    expect(uhmm_region_alloc(mm, 100, UHMM_BACKING_ANON_PRIVATE, &r2), -EINVAL, "multiple",
           "a region of 100 bytes");
    expect(uhmm_region_alloc(mm, 0, UHMM_BACKING_ANON_PRIVATE, &r2), -EINVAL, NULL, "a region of 0 bytes");
    expect(uhmm_region_alloc(mm, UHMM_PAGE_SIZE, 99, &r2), -EINVAL, "backing 99", "a bad backing");
    expect(uhmm_region_alloc(mm, UHMM_PAGE_SIZE, UHMM_BACKING_ANON_PRIVATE, NULL), -EINVAL, "out is NULL",
           "a region into NULL");
    expect(uhmm_mm_set_fault_block(mm, 3000), -EINVAL, "power of two", "a fault block of 3000 bytes");
    expect(uhmm_mm_set_fault_block(mm, 16384), 0, NULL, "a fault block of 16 KiB");
    size_t fb = 0;
    check(uhmm_mm_fault_block(mm, &fb) == 0 && fb == 16384, "the fault block reads back");
    uhmm_page_state ps;
    expect(uhmm_mm_page_state(mm, 0x1000, &ps), -EFAULT, "not (entirely) inside managed", "the state of an unmanaged page");

    /* Owners: 0 and made-up ones are refused. */
    uint64_t owner = uhmm_owner_unique();
    check(owner != 0 && uhmm_owner_unique() != owner, "owners are unique and non-zero");
    uhmm_pagemap_ops ops = {NULL, dummy_to_ram, NULL};
    uhmm_pagemap_ops no_ops = {NULL, NULL, NULL};
    uhmm_pagemap *pm = NULL, *pm2 = NULL;
    expect(uhmm_pagemap_create(mm, 0, &ops, NULL, 16, 1, &pm), -EINVAL, "owner 0", "a pagemap for owner 0");
    expect(uhmm_pagemap_create(mm, 0xdeadbeef, &ops, NULL, 16, 1, &pm), -EINVAL, "not made by uhmm_owner_unique",
           "a pagemap for a made-up owner");
    expect(uhmm_pagemap_create(mm, owner, NULL, NULL, 16, 1, &pm), -EINVAL, "ops is NULL", "a pagemap without ops");
    expect(uhmm_pagemap_create(mm, owner, &no_ops, NULL, 16, 1, &pm), -EINVAL, "migrate_to_ram",
           "a pagemap without migrate_to_ram");
    expect(uhmm_pagemap_create(mm, owner, &ops, NULL, (size_t)1 << 30, 1, &pm), -EINVAL, "chunk_pages",
           "a chunk of 2^30 pages");
    expect(uhmm_pagemap_create(mm, owner, &ops, NULL, 16, 2, &pm), 0, NULL, "a pagemap of 2 chunks of 16 pages");
    expect(uhmm_pagemap_create(mm, owner, &ops, NULL, 16, 2, &pm2), -EEXIST, "already has a DevicePagemap",
           "a second pagemap for the owner");

    /* Device pages: exhaustion, bad and double puts. */
    uint64_t pfns[40];
    expect(uhmm_pagemap_alloc(pm, 40, pfns), -ENOMEM, "exhausted", "40 pages of a 32-page pagemap");
    expect(uhmm_pagemap_alloc(pm, 2, NULL), -EINVAL, "pfns is NULL", "pages into NULL");
    expect(uhmm_pagemap_alloc(pm, 2, pfns), 0, NULL, "2 device pages");
    expect(uhmm_pagemap_get(pm, pfns[0]), 0, NULL, "a second reference");
    expect(uhmm_pagemap_put(pm, pfns[0]), 0, NULL, "put (1 of 2)");
    expect(uhmm_pagemap_put(pm, pfns[0]), 0, NULL, "put (2 of 2)");
    expect(uhmm_pagemap_put(pm, pfns[0]), -EINVAL, "not an allocated page", "a third put");
    expect(uhmm_pagemap_put(pm, 31), -EINVAL, "not an allocated page", "a put of a page never handed out");
    expect(uhmm_pagemap_put(pm, pfns[1]), 0, NULL, "put of the second page");

    /* Notifiers and range_fault. */
    uhmm_notifier *n = NULL;
    expect(uhmm_notifier_insert(mm, base, 4 * UHMM_PAGE_SIZE, NULL, NULL, &n), -EINVAL, "invalidate is NULL",
           "a notifier without a callback");
    expect(uhmm_notifier_insert(mm, base + 1, 4 * UHMM_PAGE_SIZE, plain_invalidate, NULL, &n), -EINVAL, NULL,
           "a notifier at an unaligned address");
    expect(uhmm_notifier_insert(mm, base, 4 * UHMM_PAGE_SIZE, plain_invalidate, NULL, &n), 0, NULL,
           "a notifier over 4 pages");
    uint64_t seq = 0, entries[8] = {0};
    expect(uhmm_notifier_read_begin(n, &seq), 0, NULL, "read_begin");
    uhmm_range r = {n, seq, base, 4 * UHMM_PAGE_SIZE, UHMM_PFN_REQ_FAULT | UHMM_PFN_REQ_WRITE, 0, 0, entries, 3};
    expect(uhmm_range_fault(mm, &r), -EINVAL, "npfns is 3", "range_fault with a short pfns array");
    r.npfns = 4;
    r.pfns = NULL;
    expect(uhmm_range_fault(mm, &r), -EINVAL, "pfns is NULL", "range_fault into NULL");
    r.pfns = entries;
    expect(uhmm_range_fault(mm, NULL), -EINVAL, "range is NULL", "range_fault of NULL");
    r.len = 8 * UHMM_PAGE_SIZE;
    r.npfns = 8;
    expect(uhmm_range_fault(mm, &r), -EINVAL, "not covered by the notifier", "range_fault outside its notifier");
    r.len = 4 * UHMM_PAGE_SIZE;
    r.npfns = 4;
    r.dev_private_owner = 42;
    expect(uhmm_range_fault(mm, &r), -EINVAL, "owner 42", "range_fault for a made-up owner");
    r.dev_private_owner = owner;
    expect(uhmm_range_fault(mm, &r), 0, NULL, "range_fault");
    check((entries[0] & UHMM_PFN_VALID) && (entries[0] & UHMM_PFN_WRITE) && uhmm_pfn_order(entries[0]) == 0,
          "a faulted private page is valid, writable, order 0");
    uint64_t pfn;
    expect(uhmm_pfn_device_pfn(entries[0], &pfn), -ENOENT, "not a device-private entry",
           "the device page of a system entry");
    expect(uhmm_subscription_set_seq((const uhmm_subscription *)(uintptr_t)0x2000, 1), -EINVAL,
           "not the subscription of an invalidate callback", "set_seq outside a callback");
    expect(uhmm_fault_migrate((uhmm_fault *)(uintptr_t)0x3000, NULL), -EINVAL, "out is NULL",
           "fault_migrate into NULL");
    uhmm_migrate *m = NULL;
    expect(uhmm_fault_migrate((uhmm_fault *)(uintptr_t)0x3000, &m), -EINVAL, "migrate_to_ram callback",
           "fault_migrate outside a callback");
    check(uhmm_fault_blockable(NULL) == -EINVAL && uhmm_fault_owner(NULL) == 0, "fault getters of NULL");

    /* Migrations. */
    void *plain = mmap(NULL, 4 * UHMM_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    expect(uhmm_migrate_setup(mm, (uintptr_t)plain, 4 * UHMM_PAGE_SIZE, UHMM_SELECT_SYSTEM, owner, &m), -EINVAL,
           "cannot be migrated", "migrating unmanaged memory");
    expect(uhmm_migrate_setup(mm, base, 4 * UHMM_PAGE_SIZE, 0, owner, &m), -EINVAL, "select 0",
           "migrating with no selection");
    expect(uhmm_migrate_setup(mm, base, 4 * UHMM_PAGE_SIZE, 0x80, owner, &m), -EINVAL, "select 0x80",
           "migrating with unknown selection bits");
    uint64_t other = uhmm_owner_unique();
    expect(uhmm_migrate_setup(mm, base, 4 * UHMM_PAGE_SIZE, UHMM_SELECT_SYSTEM, other, &m), -ENODEV,
           "has no DevicePagemap", "a migration for an owner with no pagemap");
    expect(uhmm_migrate_setup(mm, base, 4 * UHMM_PAGE_SIZE, UHMM_SELECT_SYSTEM, owner, NULL), -EINVAL,
           "out is NULL", "a migration into NULL");
    expect(uhmm_migrate_setup(mm, base, 4 * UHMM_PAGE_SIZE, UHMM_SELECT_SYSTEM, owner, &m), 0, NULL,
           "a migration of 4 pages");
    size_t np = 0, nsel = 0;
    expect(uhmm_migrate_selected(m, NULL, 0, &nsel), -ERANGE, "room for 0", "selected into no room");
    check(nsel == 4, "... says how many pages are selected");
    expect(uhmm_migrate_npages(m, &np, NULL), 0, NULL, "npages");
    expect(uhmm_migrate_set_device_dst(m, 0, 31), -EINVAL, "not an allocated page", "a destination never allocated");
    expect(uhmm_migrate_set_device_dst(m, 99, 0), -EINVAL, "outside the range", "a destination outside the range");
    const uint8_t *bytes = NULL;
    expect(uhmm_migrate_src_bytes(m, 99, &bytes), -ENOENT, "page 99", "src bytes outside the range");
    uint32_t outcome = 99;
    expect(uhmm_migrate_outcome(m, 0, &outcome), 0, NULL, "outcome before the commit");
    check(outcome == UHMM_OUTCOME_PENDING, "... is PENDING");
    expect(uhmm_migrate_outcome(m, 4, &outcome), -EINVAL, "the range has 4 pages", "outcome outside the range");
    expect(uhmm_migrate_pages(m), 0, NULL, "commit with no destinations");
    expect(uhmm_migrate_outcome(m, 0, &outcome), 0, NULL, "outcome after the commit");
    check(outcome == UHMM_OUTCOME_NO_DESTINATION, "... is NO_DESTINATION");
    expect(uhmm_migrate_finalize(m), 0, NULL, "finalize");
    expect(uhmm_migrate_pages(m), -EINVAL, "not a live uhmm_migrate", "a finalized migration");
    expect(uhmm_migrate_finalize(m), -EINVAL, "not a live uhmm_migrate", "a second finalize");
    check(((volatile uint8_t *)base)[0] == 0, "the memory is as it was");

    /* Destroying inside a callback is refused (it could wait for itself). */
    struct cb_state s = {.mm = mm};
    uhmm_notifier *n2 = NULL;
    expect(uhmm_notifier_insert(mm, base, 8 * UHMM_PAGE_SIZE, destroying_invalidate, &s, &n2), 0, NULL,
           "a notifier that destroys from its callback");
    s.own = n2;
    expect(uhmm_migrate_setup(mm, base, 8 * UHMM_PAGE_SIZE, UHMM_SELECT_SYSTEM, owner, &m), 0, NULL,
           "a migration (to raise an invalidation)");
    expect(uhmm_migrate_finalize(m), 0, NULL, "finalize it");
    check(s.calls > 0 && s.destroy_rc == -EDEADLK && strstr(s.msg, "inside a uhmm callback") != NULL,
          "uhmm_mm_destroy inside a callback is -EDEADLK, with a message");
    check(s.read_rc == -EDEADLK && strstr(s.read_msg, "own invalidate callback") != NULL,
          "read_begin of a notifier in its own callback is -EDEADLK, with a message");
    expect(uhmm_mm_get_stats(mm, &st), 0, NULL, "the address space is still there");
    check(st.invalidations[UHMM_EVENT_MIGRATE] >= 2, "... and counted the migrations' invalidations");

    /* Stale handles: destroyed once, refused after. */
    expect(uhmm_notifier_destroy(n2), 0, NULL, "destroy a notifier");
    expect(uhmm_notifier_destroy(n2), -EINVAL, "not a live uhmm_notifier", "destroy it again");
    expect(uhmm_notifier_destroy(n), 0, NULL, "destroy the other notifier");
    expect(uhmm_notifier_read_begin(n, &seq), -EINVAL, "not a live uhmm_notifier", "read_begin of a destroyed notifier");
    expect(uhmm_region_free(region), 0, NULL, "free the region");
    expect(uhmm_region_free(region), -EINVAL, "not a live uhmm_region", "free it again");
    expect(uhmm_pagemap_destroy(pm), 0, NULL, "destroy the pagemap");
    expect(uhmm_pagemap_alloc(pm, 1, pfns), -EINVAL, "not a live uhmm_pagemap", "alloc from a destroyed pagemap");
    expect(uhmm_mm_destroy(mm), 0, NULL, "destroy the address space");
    expect(uhmm_mm_destroy(mm), -EINVAL, "not a live uhmm_mm", "destroy it again");
    expect(uhmm_mm_get_stats(mm, &st), -EINVAL, "not a live uhmm_mm", "stats of a destroyed uhmm_mm");

    /* The message is the last call's: a success clears it. */
    uhmm_mm_destroy((uhmm_mm *)(uintptr_t)0x10);
    check(uhmm_last_error()[0] != '\0', "a failure leaves a message");
    uhmm_owner_unique();
    check(uhmm_last_error()[0] == '\0', "the next call clears it");
    munmap(plain, 4 * UHMM_PAGE_SIZE);

    if (failures) {
        printf("errors: FAILED %d of %d checks\n", failures, checks);
        return 1;
    }
    printf("errors: all %d checks passed\n", checks);
    return 0;
}
