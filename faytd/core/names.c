/* names.c: names and their namespaces, and the name index (core.h).
 *
 * A name a client chooses (a share-point's identifier; later a published
 * context's or a channel's) is only safe from squatting if no other uid can
 * take it first.  So a name lives in a namespace: the uid of the process
 * that names it (SO_PEERCRED, never the client's word), or the shared
 * namespace FAYT_NS_SHARED for the names the policy shares.  The policy's
 * shared names are patterns, a name or a prefix and '*': a name matches them
 * or not whoever asks, so every uid finds a shared name in the same place;
 * which of them a category may create or attach is a bit per pattern on its
 * connections (names_create, names_attach), compiled by faytd/policy.py.
 * "uid:<uid>/<name>" names uid's namespace explicitly: any uid's for a core
 * server (it already may destroy any share-point; it must be able to find a
 * user's), its own for anyone else.  No name in a namespace starts with
 * "uid:", so the two forms never meet.
 *
 * The index: (namespace, name) keyed with SipHash-2-4 (Aumasson and
 * Bernstein) under a key drawn at start and the namespace, as Python's dict
 * is keyed, so that no client can pick names that all fall into one bucket.
 * An entry points at its share-point (table.c), or at nothing for a name
 * Python holds (a SPECIAL|SHARE share's): one index either way.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
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

uint64_t core_hash(struct fayt_core *k, uint32_t ns, const char *s, uint32_t n)
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
    /* One key per namespace: (k0, k1 ^ ns). */
    uint64_t k1 = pv->sip_k1 ^ ns;
    uint64_t v0 = pv->sip_k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = pv->sip_k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
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

struct name_ent *core_name_find(struct fayt_core *k, uint32_t ns, const char *s, uint32_t n,
                                uint64_t h)
{
    struct fayt_core_priv *p = k->priv;
    if (!p->names_nb)
        return NULL;
    for (struct name_ent *e = p->names[h & (p->names_nb - 1)]; e; e = e->next)
        if (e->hash == h && e->ns == ns && e->len == n && memcmp(e->key, s, n) == 0)
            return e;
    return NULL;
}

struct name_ent *core_name_insert(struct fayt_core *k, uint32_t ns, const char *s, uint32_t n,
                                  int *err)
{
    struct fayt_core_priv *p = k->priv;
    uint64_t h = core_hash(k, ns, s, n);
    if (core_name_find(k, ns, s, n, h)) {
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
    e->ns = ns;
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

int fayt_fast_name_add(struct fayt_core *k, uint32_t ns, const char *ident, uint32_t len)
{
    int err = 0;
    if (!core_name_insert(k, ns, ident, len, &err))
        return err;
    return 0;
}

int fayt_fast_name_del(struct fayt_core *k, uint32_t ns, const char *ident, uint32_t len)
{
    struct name_ent *e = core_name_find(k, ns, ident, len, core_hash(k, ns, ident, len));
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
    fayt_names_set_shared(k, NULL, 0);
}

/* -- namespaces ------------------------------------------------------------ */
int fayt_names_set_shared(struct fayt_core *k, const char *const *patterns, uint32_t n)
{
    struct fayt_core_priv *p = k->priv;
    struct name_pattern set[FAYT_NAMES_SHARED_MAX];
    if (n > FAYT_NAMES_SHARED_MAX)
        return EINVAL;
    for (uint32_t i = 0; i < n; i++) {
        size_t len = strlen(patterns[i]);
        set[i].prefix = len > 0 && patterns[i][len - 1] == '*';
        set[i].len = (uint32_t)(len - set[i].prefix);
        set[i].s = malloc(set[i].len + 1);
        if (!set[i].s) {
            while (i-- > 0)
                free(set[i].s);
            return ENOMEM;
        }
        memcpy(set[i].s, patterns[i], set[i].len);
        set[i].s[set[i].len] = 0;
    }
    for (uint32_t i = 0; i < p->nshared; i++)
        free(p->shared[i].s);
    memcpy(p->shared, set, n * sizeof set[0]);
    p->nshared = n;
    return 0;
}

uint64_t fayt_names_shared(struct fayt_core *k, const char *name, uint32_t len)
{
    struct fayt_core_priv *p = k->priv;
    uint64_t bits = 0;
    for (uint32_t i = 0; i < p->nshared; i++) {
        const struct name_pattern *t = &p->shared[i];
        if ((t->prefix ? len >= t->len : len == t->len) && memcmp(name, t->s, t->len) == 0)
            bits |= 1ULL << i;
    }
    return bits;
}

/* An identifier as Python's %r of its str shows it: 'name'. */
const char *core_name_repr(const char *s, uint32_t n, char *out, size_t max)
{
    size_t o = 0;
    int dq = memchr(s, '\'', n) && !memchr(s, '"', n);
    char q = dq ? '"' : '\'';
    out[o++] = q;
    for (uint32_t i = 0; i < n && o + 6 < max; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '\\' || (ch == (unsigned char)q))
            o += (size_t)snprintf(out + o, max - o, "\\%c", ch);
        else if (ch < 0x20 || ch == 0x7f)
            o += (size_t)snprintf(out + o, max - o, ch == '\n' ? "\\n" : ch == '\t' ? "\\t"
                                  : ch == '\r' ? "\\r" : "\\x%02x", ch);
        else
            out[o++] = (char)ch;
    }
    out[o++] = q;
    out[o] = 0;
    return out;
}

#define UID_FORM "uid:"

int core_name_parse(const char *field, const char *s, uint32_t n, uint32_t *uid,
                    uint32_t *at, char *msg, size_t max)
{
    char rb[FAYT_NAME_MAX + 64];
    if (n < 4 || memcmp(s, UID_FORM, 4) != 0) {
        *at = 0;
        return 0;
    }
    uint64_t v = 0;
    uint32_t i = 4;
    while (i < n && i < 4 + 10 && s[i] >= '0' && s[i] <= '9')
        v = v * 10 + (uint64_t)(s[i++] - '0');
    if (i == 4 || i >= n || s[i] != '/' || (s[4] == '0' && i > 5) || v >= FAYT_NS_SHARED
        || i + 1 == n || (n - i - 1 >= 4 && memcmp(s + i + 1, UID_FORM, 4) == 0))
        return core_fail(msg, max, EINVAL, "%s: %s: a name that starts with \"uid:\" is "
                         "uid:<uid>/<name>, <uid> in decimal, <name> not empty nor itself "
                         "starting with \"uid:\"", field,
                         core_name_repr(s, n, rb, sizeof rb));
    *uid = (uint32_t)v;
    *at = i + 1;
    return 0;
}

int fayt_name_resolve(struct fayt_core *k, const struct fayt_fast_conn *c, const char *field,
                      const char *ident, uint32_t len, int how, struct fayt_name_ref *out,
                      char *msg, uint32_t max)
{
    char rb[FAYT_NAME_MAX + 64];
    uint32_t uid = 0, at = 0;
    int e = core_name_parse(field, ident, len, &uid, &at, msg, max);
    if (e)
        return e;
    out->at = at;
    out->len = len - at;
    out->explicit_uid = at != 0;
    if (at) {
        if (uid != c->uid && !(c->flags & FAYT_FAST_CONN_CORE))
            return core_fail(msg, max, EPERM, "%s: %s names uid %u's namespace; only a core "
                             "server may name another uid's", field,
                             core_name_repr(ident, len, rb, sizeof rb), uid);
        out->ns = uid;
        return 0;
    }
    uint64_t shared = k->priv->nshared ? fayt_names_shared(k, ident, len) : 0;
    if (!shared) {
        out->ns = c->uid;
        return 0;
    }
    out->ns = FAYT_NS_SHARED;
    uint64_t may = how == FAYT_NAME_CREATE ? c->names_create : c->names_attach;
    if (!(c->flags & FAYT_FAST_CONN_CORE) && !(shared & may)) {
        const struct name_pattern *t = &k->priv->shared[__builtin_ctzll(shared)];
        return core_fail(msg, max, EPERM, "%s: %s is a shared name (policy pattern '%s%s'), "
                         "which this context's category may not %s", field,
                         core_name_repr(ident, len, rb, sizeof rb), t->s, t->prefix ? "*" : "",
                         how == FAYT_NAME_CREATE ? "create" : "attach");
    }
    return 0;
}
