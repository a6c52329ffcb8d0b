/* decode.c: the one decoder of struct portal_req (core.h), for the C path
 * and for faytd's Python alike (faytd/syscalls/portal.py calls
 * fayt_portal_decode).
 *
 * It copies nothing it has not bounds-checked, the way a kernel's
 * copy_from_user would: a pointer field of portal_req is 0 or 1 + an offset
 * into the message's trailer (after paddr[] for DIRECT and COW), and the
 * string there must end inside it; a share-point's identifier in the
 * "uid:<uid>/<name>" form must be well formed (names.c: where it resolves is
 * the caller's, with the context).  A refusal is an errno and a message that
 * names the argument at fault.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

static const struct {
    const char *name;
    int bit;
} class_bits[] = {
    {"SHARE", FAYT_PORTAL_SHARE}, {"DIRECT", FAYT_PORTAL_DIRECT}, {"ANON", FAYT_PORTAL_ANON},
    {"COW", FAYT_PORTAL_COW}, {"SPECIAL", FAYT_PORTAL_SPECIAL},
};

static int valid_type(int t)
{
    static const int valid[] = {
        FAYT_PORTAL_ANON, FAYT_PORTAL_SHARE | FAYT_PORTAL_ANON,
        FAYT_PORTAL_SHARE | FAYT_PORTAL_DIRECT, FAYT_PORTAL_DIRECT, FAYT_PORTAL_COW,
        FAYT_PORTAL_SPECIAL, FAYT_PORTAL_SPECIAL | FAYT_PORTAL_SHARE,
    };
    for (size_t i = 0; i < sizeof valid / sizeof valid[0]; i++)
        if (t == valid[i])
            return 1;
    return 0;
}

/* "%#x" as Python prints it: 0x1f, -0x20. */
static const char *hex(char *b, size_t n, long long v)
{
    if (v < 0)
        snprintf(b, n, "-0x%llx", (unsigned long long)-v);
    else
        snprintf(b, n, "0x%llx", (unsigned long long)v);
    return b;
}

/* Strict UTF-8, as Python's decode("utf-8") takes it: no overlong forms, no
 * surrogates, nothing above U+10FFFF. */
int core_utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t k;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            k = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (i + k >= n)
            return 0;
        for (size_t j = 1; j <= k; j++) {
            unsigned b = s[i + j];
            if ((b & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (b & 0x3F);
        }
        if (k == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)))
            return 0;
        if (k == 3 && (cp < 0x10000 || cp > 0x10FFFF))
            return 0;
        i += k + 1;
    }
    return 1;
}

/* The string a pointer field names: *at, *len set (at -1 for NULL); 0 or
 * an errno with its message. */
static int string_at(const uint8_t *body, size_t blen, size_t trailer_at, uint64_t ptr,
                     const char *field, size_t limit, int32_t *at, int32_t *len, char *msg,
                     size_t max)
{
    *at = -1;
    *len = 0;
    if (ptr == 0)
        return 0;
    if (ptr - 1 >= blen || trailer_at + (ptr - 1) >= blen)
        return core_fail(msg, max, EFAULT, "%s: points outside the request", field);
    size_t start = trailer_at + (ptr - 1);
    size_t room = blen - start;
    const uint8_t *nul = memchr(body + start, 0, room < limit + 1 ? room : limit + 1);
    if (!nul) {
        if (room > limit)
            return core_fail(msg, max, ENAMETOOLONG, "%s: longer than %zu bytes", field, limit);
        return core_fail(msg, max, EFAULT, "%s: not terminated inside the request", field);
    }
    size_t n = (size_t)(nul - (body + start));
    if (!core_utf8_valid(body + start, n))
        return core_fail(msg, max, EINVAL, "%s: not valid UTF-8", field);
    *at = (int32_t)start;
    *len = (int32_t)n;
    return 0;
}

int fayt_portal_decode(struct fayt_core *k, const uint8_t *body, uint32_t blen,
                       struct fayt_portal_args *a, char *msg, uint32_t max)
{
    struct portal_req req;
    char hb[32];
    memset(a, 0, sizeof *a);
    a->ident_at = a->chain_at = a->message_at = -1;
    if (blen < sizeof req)
        return core_fail(msg, max, EFAULT, "portal_req: %u bytes sent, the struct has %zu", blen,
                    sizeof req);
    memcpy(&req, body, sizeof req);
    int t = req.type;
    a->type = t;
    a->prot = req.prot;
    a->length = req.length;
    a->share_type = req.share.type;
    a->create = req.share.create;
    a->ident_p = (uint64_t)(uintptr_t)req.share.identifier;
    a->chain_p = (uint64_t)(uintptr_t)req.sp_req_chain.name;
    a->message_p = (uint64_t)(uintptr_t)req.sp_req_chain.message;
    a->addr = req.morphology.addr;
    a->mlen = req.morphology.length;
    if (t & ~FAYT_PORTAL_CLASSES)
        return core_fail(msg, max, EINVAL, "type: unknown class bits %s",
                    hex(hb, sizeof hb, (long long)(t & ~FAYT_PORTAL_CLASSES)));
    if (!valid_type(t)) {
        char names[64] = "";
        for (size_t i = 0; i < sizeof class_bits / sizeof class_bits[0]; i++)
            if (t & class_bits[i].bit)
                snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s",
                         names[0] ? "|" : "", class_bits[i].name);
        return core_fail(msg, max, EINVAL, "type: %s is not a valid combination of classes",
                    names[0] ? names : "none");
    }
    if (req.prot & ~FAYT_PROT_ALL)
        return core_fail(msg, max, EINVAL, "prot: unknown bits %s",
                    hex(hb, sizeof hb, (long long)(req.prot & ~FAYT_PROT_ALL)));
    if (a->addr % FAYT_PAGE_SIZE)
        return core_fail(msg, max, EINVAL, "morphology.addr: %#llx is not 4 KiB aligned",
                    (unsigned long long)a->addr);
    uint64_t npaddr = t & (FAYT_PORTAL_DIRECT | FAYT_PORTAL_COW)
        ? a->mlen / FAYT_PAGE_SIZE + (a->mlen % FAYT_PAGE_SIZE != 0) : 0;
    if (npaddr > (blen - sizeof req) / 8)
        return core_fail(msg, max, EFAULT, "morphology.paddr: %llu entries named, fewer sent",
                    (unsigned long long)npaddr);
    size_t trailer_at = sizeof req + (size_t)npaddr * 8;
    int32_t at[3], len[3];
    int e;
    if ((e = string_at(body, blen, trailer_at, a->ident_p, "share.identifier", FAYT_NAME_MAX,
                       &at[0], &len[0], msg, max))
        || (e = string_at(body, blen, trailer_at, a->chain_p, "sp_req_chain.name",
                          FAYT_NAME_MAX, &at[1], &len[1], msg, max))
        || (e = string_at(body, blen, trailer_at, a->message_p, "sp_req_chain.message",
                          FAYT_MESSAGE_MAX, &at[2], &len[2], msg, max)))
        return e;
    a->ident_at = at[0];
    a->ident_len = len[0];
    a->chain_at = at[1];
    a->chain_len = len[1];
    a->message_at = at[2];
    a->message_len = len[2];
    a->attach = (t & FAYT_PORTAL_SHARE) && req.share.create == FAYT_SHARE_ATTACH;
    if (req.length < 0 || (req.length == 0 && !a->attach))
        return core_fail(msg, max, EINVAL, "length: %d; a portal needs at least 1 byte", req.length);
    if ((uint64_t)req.length > k->max_portal_length)
        return core_fail(msg, max, EINVAL, "length: %d is more than one portal may map (%llu)",
                    req.length, (unsigned long long)k->max_portal_length);
    if (a->mlen != 0 && a->mlen != (uint64_t)req.length)
        return core_fail(msg, max, EINVAL, "morphology.length: %llu differs from length %d",
                    (unsigned long long)a->mlen, req.length);
    if (t & FAYT_PORTAL_SHARE) {
        if (a->ident_at < 0 || a->ident_len == 0)
            return core_fail(msg, max, EINVAL, "share.identifier: a share-point needs a name");
        uint32_t uid, at;               /* the "uid:<uid>/<name>" form, if used, well formed */
        if ((e = core_name_parse("share.identifier", (const char *)body + a->ident_at,
                                 (uint32_t)a->ident_len, &uid, &at, msg, max)))
            return e;
        if (req.share.create != FAYT_SHARE_ATTACH && req.share.create != FAYT_SHARE_CREATE)
            return core_fail(msg, max, EINVAL, "share.create: %d is neither 0 nor 1",
                        req.share.create);
        if (req.share.type == FAYT_SHARE_ADVANCED)
            return core_fail(msg, max, ENOSYS,
                        "share.type: the advanced share-point is not built yet");
        if (req.share.type != FAYT_SHARE_TRIVIAL)
            return core_fail(msg, max, EINVAL, "share.type: unknown type %d", req.share.type);
    } else if (t == FAYT_PORTAL_COW && a->ident_at >= 0) {
        /* COW's source named as a share-point (faytd/cow.py): the name
         * well formed; paddr[] empty; nothing is created. */
        uint32_t uid, at;
        if (a->ident_len == 0)
            return core_fail(msg, max, EINVAL, "share.identifier: empty (a COW source "
                             "share-point needs a name)");
        if ((e = core_name_parse("share.identifier", (const char *)body + a->ident_at,
                                 (uint32_t)a->ident_len, &uid, &at, msg, max)))
            return e;
        if (a->mlen != 0)
            return core_fail(msg, max, EINVAL, "share.identifier and morphology.paddr: both "
                             "name a COW source; give one (morphology.length 0 with "
                             "share.identifier)");
        if (req.share.create != FAYT_SHARE_ATTACH)
            return core_fail(msg, max, EINVAL, "share.create: %d; a COW source share-point "
                             "is read, not created (0)", req.share.create);
    } else if (a->ident_at >= 0) {
        return core_fail(msg, max, EINVAL, "share.identifier: given without the SHARE class "
                         "(or COW)");
    }
    if ((a->chain_at >= 0 || a->message_at >= 0) && !(t & FAYT_PORTAL_SPECIAL))
        return core_fail(msg, max, EINVAL, "sp_req_chain: given without the SPECIAL class");
    return 0;
}
