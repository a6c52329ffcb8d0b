/* names.c: the name index: every share-point's identifier (core.h).
 *
 * Identifiers are chosen by clients: the table is keyed with SipHash-2-4
 * (Aumasson and Bernstein) under a key drawn at start, as Python's dict is,
 * so that no client can pick names that all fall into one bucket.  An entry
 * points at its share-point (table.c), or at nothing for a name Python holds
 * (a SPECIAL|SHARE share's): one namespace either way.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                         \
    do {                                                                 \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);         \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                           \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                           \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);         \
    } while (0)

uint64_t core_hash(struct fayt_core *k, const char *s, uint32_t n)
{
    struct fayt_core_priv *pv = k->priv;
    if (!pv->sip_keyed) {
        uint64_t key[2] = {0, 0};
        if (getrandom(key, sizeof key, GRND_NONBLOCK) != (ssize_t)sizeof key) {
            /* No entropy yet (early boot): what this run alone has. */
            struct timespec t;
            clock_gettime(CLOCK_MONOTONIC, &t);
            key[0] ^= (uint64_t)t.tv_nsec * 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid() << 32;
            key[1] ^= (uint64_t)(uintptr_t)pv ^ (uint64_t)t.tv_sec * 0xC2B2AE3D27D4EB4FULL;
        }
        pv->sip_k0 = key[0];
        pv->sip_k1 = key[1];
        pv->sip_keyed = 1;
    }
    uint64_t v0 = pv->sip_k0 ^ 0x736f6d6570736575ULL, v1 = pv->sip_k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = pv->sip_k0 ^ 0x6c7967656e657261ULL, v3 = pv->sip_k1 ^ 0x7465646279746573ULL;
    const unsigned char *p = (const unsigned char *)s;
    uint32_t left = n;
    while (left >= 8) {
        uint64_t m;
        memcpy(&m, p, 8);               /* little-endian on the machines faytd runs on */
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
        p += 8;
        left -= 8;
    }
    uint64_t b = (uint64_t)n << 56;
    for (uint32_t i = 0; i < left; i++)
        b |= (uint64_t)p[i] << (8 * i);
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static int names_grow(struct fayt_core_priv *p)
{
    uint32_t nb = p->names_nb ? p->names_nb * 2 : 1024;
    struct name_ent **b = calloc(nb, sizeof *b);
    if (!b)
        return ENOMEM;
    for (uint32_t i = 0; i < p->names_nb; i++) {
        struct name_ent *e = p->names[i];
        while (e) {
            struct name_ent *next = e->next;
            e->next = b[e->hash & (nb - 1)];
            b[e->hash & (nb - 1)] = e;
            e = next;
        }
    }
    free(p->names);
    p->names = b;
    p->names_nb = nb;
    return 0;
}

struct name_ent *core_name_find(struct fayt_core *k, const char *s, uint32_t n, uint64_t h)
{
    struct fayt_core_priv *p = k->priv;
    if (!p->names_nb)
        return NULL;
    for (struct name_ent *e = p->names[h & (p->names_nb - 1)]; e; e = e->next)
        if (e->hash == h && e->len == n && memcmp(e->key, s, n) == 0)
            return e;
    return NULL;
}

struct name_ent *core_name_insert(struct fayt_core *k, const char *s, uint32_t n, int *err)
{
    struct fayt_core_priv *p = k->priv;
    uint64_t h = core_hash(k, s, n);
    if (core_name_find(k, s, n, h)) {
        *err = EEXIST;
        return NULL;
    }
    if (p->names_n >= p->names_nb && names_grow(p)) {
        *err = ENOMEM;
        return NULL;
    }
    struct name_ent *e = malloc(sizeof *e + n);
    if (!e) {
        *err = ENOMEM;
        return NULL;
    }
    e->hash = h;
    e->len = n;
    e->sp = NULL;
    memcpy(e->key, s, n);
    e->next = p->names[h & (p->names_nb - 1)];
    p->names[h & (p->names_nb - 1)] = e;
    p->names_n++;
    return e;
}

void core_name_remove(struct fayt_core *k, struct name_ent *e)
{
    struct fayt_core_priv *pv = k->priv;
    struct name_ent **p = &pv->names[e->hash & (pv->names_nb - 1)];
    while (*p && *p != e)
        p = &(*p)->next;
    if (*p) {
        *p = e->next;
        pv->names_n--;
    }
    free(e);
}

int fayt_fast_name_add(struct fayt_core *k, const char *ident, uint32_t len)
{
    int err = 0;
    if (!core_name_insert(k, ident, len, &err))
        return err;
    return 0;
}

int fayt_fast_name_del(struct fayt_core *k, const char *ident, uint32_t len)
{
    struct name_ent *e = core_name_find(k, ident, len, core_hash(k, ident, len));
    if (!e)
        return ENOENT;
    if (e->sp)                  /* a share-point's: only its destroy removes it */
        return EBUSY;
    core_name_remove(k, e);
    return 0;
}

void core_names_fini(struct fayt_core *k)
{
    struct fayt_core_priv *p = k->priv;
    for (uint32_t i = 0; i < p->names_nb; i++) {
        struct name_ent *e = p->names[i];
        while (e) {
            struct name_ent *next = e->next;
            free(e);
            e = next;
        }
    }
    free(p->names);
    p->names = NULL;
    p->names_nb = p->names_n = 0;
}
