/*
 * The rest of the C ABI, each path checked: host-RAM device memory with
 * moves both ways (no copy), a migrate_to_ram that answers nonsense once,
 * eviction, exclusive access, range_fault in the driver's encoding, an
 * invalidate callback that refuses a blockable range, an add_chunk that
 * fails, and memory the program had (uhmm_mm_manage). Exit 0 only if
 * every check passed. Run by tests/c_programs.rs.
 */
#define _GNU_SOURCE
#include <uhmm.h>

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define NPAGES 8
#define PAGE UHMM_PAGE_SIZE

static int checks, failures;

static void check(bool ok, const char *what)
{
    checks++;
    if (!ok)
        failures++;
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}

static bool must(int rc, const char *call)
{
    if (rc != 0)
        printf("FAIL %s: %s (%s)\n", call, strerror(-rc), uhmm_last_error());
    check(rc == 0, call);
    return rc == 0;
}

static uint8_t pattern(size_t page, size_t byte)
{
    return (uint8_t)(page * 13 + byte * 3 + 5);
}

struct dev {
    uint8_t *devbase; /* the uhmm_devmem: device page pfn is at devbase + pfn * PAGE */
    atomic_int to_ram_calls, evictions, nonsense_left, freed, chunks;
    atomic_int eviction_addr_rc, eviction_blockable, copied_back;
};

static void dev_page_free(void *ctx, uint64_t pfn)
{
    struct dev *d = ctx;
    (void)pfn;
    atomic_fetch_add(&d->freed, 1);
}

static int dev_add_chunk(void *ctx, uint64_t first, size_t npages)
{
    struct dev *d = ctx;
    (void)first;
    (void)npages;
    atomic_fetch_add(&d->chunks, 1);
    return 0;
}

static int failing_add_chunk(void *ctx, uint64_t first, size_t npages)
{
    (void)ctx;
    (void)first;
    (void)npages;
    return -ENOSPC;
}

/* Brings pages home from host RAM: by one kernel copy for a CPU fault, by
 * a move (no copy) for an eviction. The first call answers nonsense (a
 * positive number): a device failure for uhmm, which calls again. */
static int dev_migrate_to_ram(void *ctx, uhmm_fault *f)
{
    struct dev *d = ctx;
    atomic_fetch_add(&d->to_ram_calls, 1);
    if (atomic_fetch_sub(&d->nonsense_left, 1) > 0)
        return 12345;
    size_t addr;
    if (uhmm_fault_addr(f, &addr) == -ENOENT) {
        atomic_fetch_add(&d->evictions, 1);
        atomic_store(&d->eviction_addr_rc, -ENOENT);
        atomic_store(&d->eviction_blockable, uhmm_fault_blockable(f));
    }
    uhmm_migrate *m;
    int rc = uhmm_fault_migrate(f, &m);
    if (rc != 0)
        return rc;
    size_t npages = 0, nsel = 0, k = 0;
    uhmm_migrate_npages(m, &npages, NULL);
    uhmm_migrate_page *sel = calloc(npages, sizeof *sel);
    uhmm_move_back *back = calloc(npages, sizeof *back);
    if (sel && back && uhmm_migrate_selected(m, sel, npages, &nsel) == 0) {
        for (size_t i = 0; i < nsel; i++)
            if (sel[i].src == UHMM_SRC_DEVICE)
                back[k++] = (uhmm_move_back){sel[i].index, (uintptr_t)(d->devbase + sel[i].device_pfn * PAGE)};
        /* A CPU fault copies them back (one kernel copy from memory the
         * CPU can read); an eviction moves them. */
        if (uhmm_fault_blockable(f) == 0) {
            atomic_fetch_add(&d->copied_back, (int)k);
            uhmm_migrate_copy_from_device(m, back, k);
        } else
            uhmm_migrate_move_from_device(m, back, k);
        uhmm_migrate_pages(m);
    } else
        rc = -ENOMEM;
    free(sel);
    free(back);
    uhmm_migrate_finalize(m);
    return rc;
}

/* Moves [base, +len) into the device's host RAM, with no copy where it can. */
static int migrate_to_device(uhmm_mm *mm, uhmm_pagemap *pm, struct dev *d, uint64_t owner, uintptr_t base,
                             size_t npages, size_t *moved_nocopy, size_t *migrated, bool *outcomes_ok)
{
    uhmm_migrate *m;
    int rc = uhmm_migrate_setup(mm, base, npages * PAGE, UHMM_SELECT_SYSTEM, owner, &m);
    if (rc != 0)
        return rc;
    uhmm_migrate_page sel[NPAGES];
    uint64_t pfns[NPAGES];
    uhmm_move_page moves[NPAGES];
    size_t done[NPAGES], nsel = 0, ndone = 0;
    if ((rc = uhmm_migrate_selected(m, sel, NPAGES, &nsel)) != 0 || (rc = uhmm_pagemap_alloc(pm, nsel, pfns)) != 0) {
        uhmm_migrate_finalize(m);
        return rc;
    }
    for (size_t i = 0; i < nsel; i++)
        moves[i] = (uhmm_move_page){sel[i].index, pfns[i], (uintptr_t)(d->devbase + pfns[i] * PAGE)};
    if ((rc = uhmm_migrate_move_to_device(m, moves, nsel, done, &ndone)) != 0) {
        uhmm_migrate_finalize(m);
        return rc;
    }
    *moved_nocopy = ndone;
    for (size_t i = 0; i < nsel; i++) {
        bool was_moved = false;
        for (size_t j = 0; j < ndone; j++)
            was_moved |= done[j] == sel[i].index;
        if (was_moved)
            continue;
        const uint8_t *src; /* could not move: copy */
        if (uhmm_migrate_src_bytes(m, sel[i].index, &src) == 0)
            memcpy(d->devbase + pfns[i] * PAGE, src, PAGE);
        if (uhmm_migrate_set_device_dst(m, sel[i].index, pfns[i]) != 0)
            uhmm_pagemap_put(pm, pfns[i]);
    }
    uhmm_migrate_pages(m);
    uhmm_migrate_migrated_count(m, migrated);
    *outcomes_ok = true;
    for (size_t i = 0; i < npages; i++) {
        uint32_t o = 0;
        *outcomes_ok &= uhmm_migrate_outcome(m, i, &o) == 0 && o == UHMM_OUTCOME_MIGRATED;
    }
    return uhmm_migrate_finalize(m);
}

static bool refusing_invalidate(void *ctx, const uhmm_subscription *sub, const uhmm_notifier_range *r,
                                uint64_t seq)
{
    (void)sub;
    (void)r;
    (void)seq;
    atomic_fetch_add((atomic_int *)ctx, 1);
    return false; /* nonsense for a blockable range: uhmm takes it as true */
}

static bool plain_invalidate(void *ctx, const uhmm_subscription *sub, const uhmm_notifier_range *r,
                             uint64_t seq)
{
    (void)ctx;
    (void)r;
    uhmm_subscription_set_seq(sub, seq);
    return true;
}

/* The driver's encoding: page number << 1 | valid. */
static uint64_t encode(void *ctx, size_t addr, uint64_t pfn)
{
    atomic_fetch_add((atomic_int *)ctx, 1);
    return ((uint64_t)addr / PAGE) << 1 | ((pfn & UHMM_PFN_VALID) ? 1 : 0);
}

static bool data_ok(const uint8_t *p, size_t npages)
{
    for (size_t i = 0; i < npages; i++)
        for (size_t b = 0; b < PAGE; b++)
            if (p[i * PAGE + b] != pattern(i, b))
                return false;
    return true;
}

int main(void)
{
    static struct dev dev;
    struct dev *d = &dev;
    uhmm_mm *mm;
    if (!must(uhmm_mm_create(&mm), "uhmm_mm_create"))
        return 1;
    uhmm_region *region;
    if (!must(uhmm_region_alloc(mm, NPAGES * PAGE, UHMM_BACKING_ANON_PRIVATE, &region), "uhmm_region_alloc"))
        return 1;
    uint8_t *cpu = uhmm_region_addr(region);
    uintptr_t base = (uintptr_t)cpu;
    for (size_t i = 0; i < NPAGES; i++)
        for (size_t b = 0; b < PAGE; b++)
            cpu[i * PAGE + b] = pattern(i, b);

    /* range_fault in the driver's encoding. */
    uhmm_notifier *n;
    if (!must(uhmm_notifier_insert(mm, base, NPAGES * PAGE, plain_invalidate, NULL, &n), "uhmm_notifier_insert"))
        return 1;
    atomic_int encoded = 0;
    uint64_t seq, pfns[NPAGES], entries[NPAGES];
    uhmm_notifier_read_begin(n, &seq);
    uhmm_range r = {n, seq, base, NPAGES * PAGE, UHMM_PFN_REQ_FAULT, 0, 0, pfns, NPAGES};
    must(uhmm_range_fault_encoded(mm, &r, encode, &encoded, entries), "uhmm_range_fault_encoded");
    bool enc_ok = atomic_load(&encoded) == NPAGES;
    for (size_t i = 0; i < NPAGES; i++)
        enc_ok &= entries[i] == (((base / PAGE) + i) << 1 | 1) && (pfns[i] & UHMM_PFN_VALID);
    check(enc_ok, "range_fault_encoded gave each page in the driver's encoding");
    uhmm_notifier_destroy(n);

    /* Host-RAM device memory and a pagemap whose migrate_to_ram moves back. */
    uint64_t owner = uhmm_owner_unique();
    uhmm_devmem *dm;
    uhmm_pagemap *pm;
    uhmm_pagemap_ops ops = {dev_page_free, dev_migrate_to_ram, dev_add_chunk};
    if (!must(uhmm_devmem_create(mm, 16 * PAGE, &dm), "uhmm_devmem_create") ||
        !must(uhmm_pagemap_create(mm, owner, &ops, d, 16, 1, &pm), "uhmm_pagemap_create"))
        return 1;
    d->devbase = uhmm_devmem_addr(dm);
    size_t nocopy = 0, migrated = 0;
    bool outcomes = false;
    must(migrate_to_device(mm, pm, d, owner, base, NPAGES, &nocopy, &migrated, &outcomes), "migrate to device");
    check(migrated == NPAGES && outcomes, "8 pages migrated, each outcome MIGRATED");
    check(nocopy == NPAGES, "... all moved into host-RAM device memory with no copy");
    check(atomic_load(&d->chunks) == 1, "add_chunk was called for the first chunk");
    uhmm_page_state st;
    check(uhmm_mm_page_state(mm, base, &st) == 0 && st.kind == UHMM_PAGE_DEVICE && st.owner == owner,
          "page 0 is in the device's memory");
    check(data_ok(d->devbase + st.pfn * PAGE, 1), "its data is in the device's host RAM");

    /* The CPU reads; the device answers nonsense first, then brings them back. */
    atomic_store(&d->nonsense_left, 1);
    check(data_ok(cpu, NPAGES), "the CPU reads every byte back after a nonsense answer");
    check(atomic_load(&d->to_ram_calls) >= 2, "migrate_to_ram was called again after its nonsense answer");
    check(atomic_load(&d->copied_back) > 0, "... which copied them back (uhmm_migrate_copy_from_device)");
    uhmm_mm_stats ms;
    check(uhmm_mm_get_stats(mm, &ms) == 0 && ms.pages_lost == 0 && ms.faults_sigbus == 0, "nothing lost, no SIGBUS");

    /* Eviction: back on the device, then every page home. */
    must(migrate_to_device(mm, pm, d, owner, base, NPAGES, &nocopy, &migrated, &outcomes), "migrate to device again");
    check(migrated == NPAGES, "8 pages on the device again");
    must(uhmm_pagemap_evict_all(pm), "uhmm_pagemap_evict_all");
    check(atomic_load(&d->evictions) > 0 && atomic_load(&d->eviction_addr_rc) == -ENOENT &&
              atomic_load(&d->eviction_blockable) == 1,
          "an eviction is blockable and has no CPU address");
    bool home = true;
    for (size_t i = 0; i < NPAGES; i++)
        home &= uhmm_mm_page_state(mm, base + i * PAGE, &st) == 0 && st.kind == UHMM_PAGE_SYSTEM;
    check(home, "every page is home after the eviction");
    uhmm_pagemap_stats ps;
    check(uhmm_pagemap_get_stats(pm, &ps) == 0 && ps.in_use == 0 && ps.freed == 2 * NPAGES &&
              atomic_load(&d->freed) == 2 * NPAGES,
          "every device page was freed");
    check(data_ok(cpu, NPAGES), "the data survived the eviction");

    /* Exclusive access: the device writes, the CPU's touch takes the page back. */
    size_t count = 0;
    void *xpage = NULL;
    must(uhmm_mm_make_device_exclusive(mm, base, 2 * PAGE, owner, &count), "uhmm_mm_make_device_exclusive");
    check(count == 2, "2 pages exclusive");
    check(uhmm_mm_page_state(mm, base, &st) == 0 && st.kind == UHMM_PAGE_EXCLUSIVE && st.owner == owner,
          "page 0 is exclusive to the device");
    must(uhmm_mm_exclusive_page(mm, base, owner, &xpage), "uhmm_mm_exclusive_page");
    if (xpage)
        ((volatile uint8_t *)xpage)[0] = 0xA5; /* a device atomic */
    check(((volatile uint8_t *)cpu)[0] == 0xA5, "the CPU sees the device's write after revoking");
    check(uhmm_mm_page_state(mm, base, &st) == 0 && st.kind == UHMM_PAGE_SYSTEM, "page 0 is the CPU's again");
    check(uhmm_mm_exclusive_page(mm, base, owner, &xpage) == -ENOENT, "... and no longer exclusive");
    cpu[0] = pattern(0, 0);

    /* A callback that refuses a blockable invalidation: taken as done. */
    atomic_int refused = 0;
    uhmm_notifier *n2;
    must(uhmm_notifier_insert(mm, base, NPAGES * PAGE, refusing_invalidate, &refused, &n2), "a refusing notifier");
    uhmm_migrate *m;
    must(uhmm_migrate_setup(mm, base, NPAGES * PAGE, UHMM_SELECT_SYSTEM, owner, &m),
         "a migration despite a refusing callback");
    uhmm_migrate_finalize(m);
    check(atomic_load(&refused) > 0, "the refusing callback was called");
    uhmm_notifier_destroy(n2);

    /* An add_chunk that fails fails the allocation. */
    uint64_t owner2 = uhmm_owner_unique();
    uhmm_pagemap_ops bad_ops = {NULL, dev_migrate_to_ram, failing_add_chunk};
    uhmm_pagemap *pm2;
    uint64_t pfn;
    must(uhmm_pagemap_create(mm, owner2, &bad_ops, d, 16, 1, &pm2), "a pagemap whose add_chunk fails");
    int rc = uhmm_pagemap_alloc(pm2, 1, &pfn);
    check(rc == -ENOMEM && strstr(uhmm_last_error(), "add_chunk failed") != NULL, "its allocation fails with -ENOMEM");
    uhmm_pagemap_destroy(pm2);

    /* Memory the program had: managed, then let go (still mapped). */
    uint8_t *own = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uhmm_region *managed;
    memset(own, 0x5a, 4 * PAGE);
    must(uhmm_mm_manage(mm, own, 4 * PAGE, &managed), "uhmm_mm_manage");
    check(uhmm_region_addr(managed) == own && uhmm_region_len(managed) == 4 * PAGE, "the managed region is the memory");
    check(uhmm_mm_manage(mm, own, 4 * PAGE, &managed) == -EEXIST, "managing it twice is -EEXIST");
    size_t unmanaged = 0;
    must(uhmm_mm_unmanage(mm, own + PAGE, 2 * PAGE, &unmanaged), "uhmm_mm_unmanage");
    check(unmanaged == 2 * PAGE, "unmanage says how much was managed");
    check(uhmm_mm_unmanage(mm, own + PAGE, 2 * PAGE, NULL) == 0, "unmanaging unmanaged memory does nothing");
    check(uhmm_mm_unmanage(mm, own + 1, PAGE, NULL) == -EINVAL, "unmanage of an unaligned range is -EINVAL");
    check(own[PAGE] == 0x5a && own[3 * PAGE - 1] == 0x5a, "the unmanaged memory keeps its data");
    must(uhmm_region_free(managed), "free the managed region");
    check(own[4 * PAGE - 1] == 0x5a, "the memory stays mapped, with its data");
    munmap(own, 4 * PAGE);

    check(data_ok(cpu, NPAGES), "the region's data is intact at the end");
    must(uhmm_pagemap_destroy(pm), "destroy the pagemap");
    must(uhmm_devmem_free(dm), "free the device memory");
    must(uhmm_region_free(region), "free the region");
    must(uhmm_mm_destroy(mm), "destroy the address space");

    if (failures) {
        printf("paths: FAILED %d of %d checks\n", failures, checks);
        return 1;
    }
    printf("paths: all %d checks passed\n", checks);
    return 0;
}
