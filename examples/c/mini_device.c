/*
 * A minimal device in C on libuhmm (the C twin of
 * crates/uhmm/examples/mini_device.rs): a page table kept coherent by an
 * interval notifier and filled by uhmm_range_fault, device memory of its
 * own (a buffer of this program's) behind a device pagemap with C ops,
 * and migration both ways.
 *
 * It checks, and prints, that:
 *   - the device mirrors what the CPU wrote (range_fault, notifier protocol);
 *   - pages migrate into its memory, and uhmm (page states) and
 *     range_fault (device-private entries of its owner) say so;
 *   - a plain CPU read of them faults them back through its migrate_to_ram,
 *     byte for byte as the CPU wrote them, and its device pages are freed.
 * Exit status 0 only if every check passed, 1 otherwise.
 *
 * Build (from the repository root, after `cargo build -p uhmm-capi`):
 *   cc -std=c11 -Wall -Wextra -O2 -Iinclude examples/c/mini_device.c \
 *      target/debug/libuhmm.a -lpthread -ldl -lm -lrt -lgcc_s -o mini_device
 * Run it as root (or with a userfaultfd that serves kernel faults).
 *
 * MINI_DEVICE_CORRUPT=1 makes the device flip one byte of its memory after
 * the migration, to show that the checks catch it (exit status 1).
 */
#define _GNU_SOURCE
#include <uhmm.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NPAGES 16
#define CHUNK_PAGES 16
#define MAX_CHUNKS 4
#define DEVICE_PAGES (CHUNK_PAGES * MAX_CHUNKS)
#define PAGE UHMM_PAGE_SIZE

enum kind { ENTRY_NONE, ENTRY_SYSTEM, ENTRY_DEVICE };

/* A translation: where the device finds a page. */
struct entry {
    enum kind kind;
    bool write;
    uint64_t pfn;
};

struct device {
    uhmm_mm *mm;
    uint64_t owner;
    uintptr_t base; /* the mirrored range */
    pthread_mutex_t lock; /* the page table's */
    struct entry table[NPAGES];
    uint8_t *memory; /* DEVICE_PAGES pages: the device's own memory */
    uhmm_notifier *notifier;
    uhmm_pagemap *pagemap;
    atomic_ulong invalidations, migrate_to_ram_calls, pages_back, pages_freed;
};

static int checks, failures;

static void check(bool ok, const char *what)
{
    checks++;
    if (!ok)
        failures++;
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}

/* A uhmm call that must succeed; its message if not. */
static bool must(int rc, const char *call)
{
    if (rc != 0) {
        printf("FAIL %s: %s (%s)\n", call, strerror(-rc), uhmm_last_error());
        checks++;
        failures++;
        return false;
    }
    return true;
}

static uint8_t pattern(size_t page, size_t byte)
{
    return (uint8_t)(page * 31 + byte * 7 + 1);
}

static struct entry *entry_of(struct device *d, uintptr_t addr)
{
    if (addr < d->base || addr >= d->base + NPAGES * PAGE)
        return NULL;
    return &d->table[(addr - d->base) / PAGE];
}

/* The notifier: under the page-table lock, record the sequence and drop
 * the system translations in the range (device pages stay where they are,
 * unless the memory itself went away). */
static bool dev_invalidate(void *ctx, const uhmm_subscription *sub,
                           const uhmm_notifier_range *r, uint64_t cur_seq)
{
    struct device *d = ctx;
    if (r->blockable)
        pthread_mutex_lock(&d->lock);
    else if (pthread_mutex_trylock(&d->lock) != 0)
        return false; /* uhmm asks again */
    uhmm_subscription_set_seq(sub, cur_seq);
    bool gone = r->event == UHMM_EVENT_UNMAP || r->event == UHMM_EVENT_CLEAR ||
                r->event == UHMM_EVENT_REMAP || r->event == UHMM_EVENT_RELEASE;
    for (uintptr_t a = r->start; a < r->start + r->len; a += PAGE) {
        struct entry *e = entry_of(d, a);
        if (e && (e->kind == ENTRY_SYSTEM || gone))
            e->kind = ENTRY_NONE;
    }
    atomic_fetch_add(&d->invalidations, 1);
    pthread_mutex_unlock(&d->lock);
    return true;
}

static void dev_page_free(void *ctx, uint64_t pfn)
{
    struct device *d = ctx;
    (void)pfn;
    atomic_fetch_add(&d->pages_freed, 1);
}

/* A CPU touched our pages: copy them back. On the fault service
 * (not blockable) never wait for the page-table lock. */
static int dev_migrate_to_ram(void *ctx, uhmm_fault *fault)
{
    struct device *d = ctx;
    atomic_fetch_add(&d->migrate_to_ram_calls, 1);
    uhmm_migrate *m = NULL;
    int rc = uhmm_fault_migrate(fault, &m); /* its invalidation takes our lock: first */
    if (rc != 0)
        return rc;
    if (uhmm_fault_blockable(fault) == 1)
        pthread_mutex_lock(&d->lock);
    else if (pthread_mutex_trylock(&d->lock) != 0) {
        uhmm_migrate_finalize(m);
        return -EAGAIN;
    }
    size_t npages = 0, nsel = 0, ndst = 0;
    uhmm_migrate_npages(m, &npages, NULL);
    uhmm_migrate_page *sel = calloc(npages, sizeof *sel);
    uhmm_migrate_dst *dst = calloc(npages, sizeof *dst);
    rc = -ENOMEM;
    if (!sel || !dst)
        goto out;
    if ((rc = uhmm_migrate_selected(m, sel, npages, &nsel)) != 0)
        goto out;
    if ((rc = uhmm_migrate_system_dsts(m, dst, npages, &ndst)) != 0)
        goto out;
    for (size_t i = 0; i < ndst; i++)
        for (size_t k = 0; k < nsel; k++)
            if (sel[k].index == dst[i].index && sel[k].src == UHMM_SRC_DEVICE)
                memcpy(dst[i].bytes, d->memory + sel[k].device_pfn * PAGE, PAGE);
    uhmm_migrate_pages(m);
    for (size_t k = 0; k < nsel; k++) {
        struct entry *e = entry_of(d, sel[k].addr);
        if (e && uhmm_migrate_migrated(m, sel[k].index) == 1) {
            e->kind = ENTRY_NONE;
            atomic_fetch_add(&d->pages_back, 1);
        }
    }
    rc = 0;
out:
    pthread_mutex_unlock(&d->lock);
    uhmm_migrate_finalize(m);
    free(sel);
    free(dst);
    return rc;
}

/* The mirror protocol: read_begin, range_fault, lock, read_retry, store. */
static int dev_mirror(struct device *d)
{
    uint64_t pfns[NPAGES];
    for (;;) {
        uint64_t seq;
        int rc = uhmm_notifier_read_begin(d->notifier, &seq);
        if (rc != 0)
            return rc;
        uhmm_range r = {
            .notifier = d->notifier,
            .notifier_seq = seq,
            .start = d->base,
            .len = NPAGES * PAGE,
            .default_flags = UHMM_PFN_REQ_FAULT,
            .pfn_flags_mask = 0,
            .dev_private_owner = d->owner,
            .pfns = pfns,
            .npfns = NPAGES,
        };
        rc = uhmm_range_fault(d->mm, &r);
        if (rc == -EBUSY)
            continue; /* an invalidation raced: begin again */
        if (rc != 0)
            return rc;
        pthread_mutex_lock(&d->lock);
        if (uhmm_notifier_read_retry(d->notifier, seq)) {
            pthread_mutex_unlock(&d->lock);
            continue;
        }
        for (size_t i = 0; i < NPAGES; i++) {
            uint64_t pfn;
            if (uhmm_pfn_device_pfn(pfns[i], &pfn) == 0)
                d->table[i] = (struct entry){ENTRY_DEVICE, false, pfn};
            else
                d->table[i] = (struct entry){ENTRY_SYSTEM, (pfns[i] & UHMM_PFN_WRITE) != 0, 0};
        }
        pthread_mutex_unlock(&d->lock);
        return 0;
    }
}

/* The device reads one page through its translation. */
static bool dev_read_page(struct device *d, size_t page, uint8_t *buf)
{
    bool ok = true;
    pthread_mutex_lock(&d->lock);
    struct entry e = d->table[page];
    if (e.kind == ENTRY_SYSTEM)
        memcpy(buf, (const void *)(d->base + page * PAGE), PAGE);
    else if (e.kind == ENTRY_DEVICE)
        memcpy(buf, d->memory + e.pfn * PAGE, PAGE);
    else
        ok = false;
    pthread_mutex_unlock(&d->lock);
    return ok;
}

/* Moves the mirrored range into device memory, copying with memcpy. */
static int dev_migrate_to_device(struct device *d, size_t *moved)
{
    uhmm_migrate *m = NULL;
    int rc = uhmm_migrate_setup(d->mm, d->base, NPAGES * PAGE, UHMM_SELECT_SYSTEM, d->owner, &m);
    if (rc != 0)
        return rc;
    uhmm_migrate_page sel[NPAGES];
    uint64_t pfns[NPAGES];
    size_t nsel = 0;
    if ((rc = uhmm_migrate_selected(m, sel, NPAGES, &nsel)) != 0 ||
        (rc = uhmm_pagemap_alloc(d->pagemap, nsel, pfns)) != 0) {
        uhmm_migrate_finalize(m);
        return rc;
    }
    for (size_t k = 0; k < nsel; k++) {
        uint8_t *page = d->memory + pfns[k] * PAGE;
        const uint8_t *src;
        if (sel[k].src == UHMM_SRC_SYSTEM && uhmm_migrate_src_bytes(m, sel[k].index, &src) == 0)
            memcpy(page, src, PAGE);
        else
            memset(page, 0, PAGE); /* a hole: allocate and clear */
        if (uhmm_migrate_set_device_dst(m, sel[k].index, pfns[k]) != 0)
            uhmm_pagemap_put(d->pagemap, pfns[k]); /* still ours: give it back */
    }
    uhmm_migrate_pages(m);
    pthread_mutex_lock(&d->lock);
    for (size_t k = 0; k < nsel; k++) {
        uint64_t pfn;
        if (uhmm_migrate_migrated(m, sel[k].index) == 1 &&
            uhmm_mm_device_page(d->mm, sel[k].addr, d->owner, &pfn) == 0)
            *entry_of(d, sel[k].addr) = (struct entry){ENTRY_DEVICE, sel[k].writable, pfn};
    }
    pthread_mutex_unlock(&d->lock);
    uhmm_migrate_migrated_count(m, moved);
    return uhmm_migrate_finalize(m);
}

int main(void)
{
    static struct device dev;
    struct device *d = &dev;
    pthread_mutex_init(&d->lock, NULL);

    if (!must(uhmm_mm_create(&d->mm), "uhmm_mm_create"))
        return 1;
    uint32_t access = 0;
    uhmm_mm_access(d->mm, &access);
    printf("uhmm address space made (%s)\n",
           access == UHMM_ACCESS_USER_MODE_ONLY ? "user-mode-only userfaultfd" : "full userfaultfd");

    /* Managed memory, written by the CPU with plain stores. */
    uhmm_region *region = NULL;
    if (!must(uhmm_region_alloc(d->mm, NPAGES * PAGE, UHMM_BACKING_ANON_PRIVATE, &region),
              "uhmm_region_alloc"))
        return 1;
    uint8_t *cpu = uhmm_region_addr(region);
    check(cpu != NULL && uhmm_region_len(region) == NPAGES * PAGE, "region has its address and length");
    for (size_t p = 0; p < NPAGES; p++)
        for (size_t b = 0; b < PAGE; b++)
            cpu[p * PAGE + b] = pattern(p, b);
    d->base = (uintptr_t)cpu;

    /* The device: its own memory, a notifier, a pagemap with C ops. */
    d->owner = uhmm_owner_unique();
    d->memory = calloc(DEVICE_PAGES, PAGE);
    uhmm_pagemap_ops ops = {
        .page_free = dev_page_free,
        .migrate_to_ram = dev_migrate_to_ram,
        .add_chunk = NULL,
    };
    if (!d->memory ||
        !must(uhmm_notifier_insert(d->mm, d->base, NPAGES * PAGE, dev_invalidate, d, &d->notifier),
              "uhmm_notifier_insert") ||
        !must(uhmm_pagemap_create(d->mm, d->owner, &ops, d, CHUNK_PAGES, MAX_CHUNKS, &d->pagemap),
              "uhmm_pagemap_create"))
        return 1;

    /* 1. Mirror: the device sees what the CPU wrote. */
    if (!must(dev_mirror(d), "mirror (range_fault)"))
        return 1;
    bool all_system = true;
    for (size_t p = 0; p < NPAGES; p++)
        all_system &= d->table[p].kind == ENTRY_SYSTEM && d->table[p].write;
    check(all_system, "range_fault mirrored all 16 pages as writable system pages");
    uint8_t *buf = malloc(PAGE);
    bool same = buf != NULL;
    for (size_t p = 0; same && p < NPAGES; p++) {
        same &= dev_read_page(d, p, buf);
        for (size_t b = 0; same && b < PAGE; b++)
            same &= buf[b] == pattern(p, b);
    }
    check(same, "the device reads what the CPU wrote, through its translations");

    /* 2. Migrate into device memory. */
    size_t moved = 0;
    if (!must(dev_migrate_to_device(d, &moved), "migrate to device"))
        return 1;
    check(moved == NPAGES, "all 16 pages migrated to device memory");
    if (getenv("MINI_DEVICE_CORRUPT"))
        d->memory[d->table[3].pfn * PAGE + 100] ^= 0xff; /* a broken device */

    bool states = true;
    for (size_t p = 0; p < NPAGES; p++) {
        uhmm_page_state st;
        states &= uhmm_mm_page_state(d->mm, d->base + p * PAGE, &st) == 0 &&
                  st.kind == UHMM_PAGE_DEVICE && st.owner == d->owner &&
                  d->table[p].kind == ENTRY_DEVICE && st.pfn == d->table[p].pfn;
    }
    check(states, "uhmm says every page is in this device's memory, at the device's pfn");

    uhmm_pagemap_stats ps;
    check(uhmm_pagemap_get_stats(d->pagemap, &ps) == 0 && ps.in_use == NPAGES && ps.owner == d->owner,
          "the pagemap has 16 device pages in use");

    /* range_fault (faulting allowed) reports them device-private, not
     * faulted back, because they are this owner's. */
    if (!must(dev_mirror(d), "mirror after migration"))
        return 1;
    bool private_ok = true;
    for (size_t p = 0; p < NPAGES; p++)
        private_ok &= d->table[p].kind == ENTRY_DEVICE;
    check(private_ok, "range_fault reports every page as DEVICE_PRIVATE for its owner");

    same = buf != NULL;
    for (size_t p = 0; same && p < NPAGES; p++) {
        same &= dev_read_page(d, p, buf);
        for (size_t b = 0; same && b < PAGE; b++)
            same &= buf[b] == pattern(p, b);
    }
    check(same, "device memory holds the CPU's data");

    /* 3. The CPU touches the pages: each read faults them back through
     * migrate_to_ram. Checked byte for byte. */
    size_t bad = 0;
    for (size_t p = 0; p < NPAGES; p++)
        for (size_t b = 0; b < PAGE; b++)
            bad += cpu[p * PAGE + b] != pattern(p, b);
    check(bad == 0, "the CPU reads back every byte it wrote (plain loads, faulted back)");
    if (bad)
        printf("     %zu bytes differ\n", bad);
    /* A faulting thread runs on as soon as its page is back, while the
     * callback and uhmm's accounting may still be finishing: let them. */
    uhmm_mm_stats ms;
    for (int i = 0; i < 5000; i++) {
        if (uhmm_mm_get_stats(d->mm, &ms) == 0 && ms.pages_to_system >= NPAGES &&
            atomic_load(&d->pages_back) >= NPAGES && atomic_load(&d->pages_freed) >= NPAGES)
            break;
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    check(atomic_load(&d->migrate_to_ram_calls) > 0 && atomic_load(&d->pages_back) == NPAGES,
          "the pages came back through the device's migrate_to_ram");
    states = true;
    for (size_t p = 0; p < NPAGES; p++) {
        uhmm_page_state st;
        states &= uhmm_mm_page_state(d->mm, d->base + p * PAGE, &st) == 0 && st.kind == UHMM_PAGE_SYSTEM;
    }
    check(states, "every page is in system memory again");
    check(uhmm_mm_get_stats(d->mm, &ms) == 0 && ms.faults_device > 0 && ms.pages_to_device == NPAGES &&
              ms.pages_to_system == NPAGES && ms.pages_lost == 0,
          "uhmm counted device faults, 16 pages each way, none lost");
    check(uhmm_pagemap_get_stats(d->pagemap, &ps) == 0 && ps.in_use == 0 &&
              atomic_load(&d->pages_freed) == NPAGES,
          "all 16 device pages were freed (page_free)");
    check(atomic_load(&d->invalidations) > 0, "the notifier was told of the migrations");

    /* Teardown: every handle, and a NULL one (a no-op). */
    check(uhmm_notifier_destroy(d->notifier) == 0 && uhmm_pagemap_destroy(d->pagemap) == 0 &&
              uhmm_region_free(region) == 0 && uhmm_mm_destroy(d->mm) == 0 && uhmm_mm_destroy(NULL) == 0,
          "every handle destroyed");
    free(buf);
    free(d->memory);

    if (failures) {
        printf("mini_device: FAILED %d of %d checks\n", failures, checks);
        return 1;
    }
    printf("mini_device: all %d checks passed\n", checks);
    return 0;
}
