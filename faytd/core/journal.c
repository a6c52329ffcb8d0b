/* journal.c: the journal records the C path writes (core.h).
 *
 * The same lines as faytd/journal.py writes (its docstring gives the
 * format), on the same O_APPEND descriptor (k->journal_fd), one write(2)
 * each, so that both sides' records stay in the order they happened.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <unistd.h>

#include "internal.h"

#define JOURNAL_LINE_MAX (128 + 2 * FAYT_OBJ_NAME_MAX + FAST_MAX_FRAMES * 11 + 2 * FAYT_NAME_MAX)

/* 0, or -1 if the record could not be written (counted for Python's log). */
int core_journal_write(struct fayt_core *k, const char *line, size_t n, int live)
{
    if (k->journal_fd < 0)
        return 0;
    k->journal_lines++;
    k->journal_live += live;
    ssize_t w = write(k->journal_fd, line, n);
    if (w != (ssize_t)n) {
        k->journal_errors++;
        return -1;
    }
    return 0;
}

int core_journal_sharepoint(struct fayt_core *k, const struct resident *r,
                            const char *ident, uint32_t ilen)
{
    if (k->journal_fd < 0)
        return 0;
    char line[JOURNAL_LINE_MAX];
    int pos = snprintf(line, sizeof line, "S %u %d %llu %u %d %llu %s%s%s ", r->sp_id, r->pid,
                       (unsigned long long)r->start, r->uid, r->prot,
                       (unsigned long long)r->length, r->object, r->split ? "+" : "",
                       r->split ? r->object2 : "");
    for (uint32_t i = 0; i < r->nframes; i++)
        pos += snprintf(line + pos, sizeof line - pos, i ? ",%u" : "%u", r->frames[i]);
    line[pos++] = ' ';
    for (uint32_t i = 0; i < ilen; i++)
        pos += snprintf(line + pos, sizeof line - pos, "%02x", (unsigned char)ident[i]);
    line[pos++] = '\n';
    return core_journal_write(k, line, pos, 1);
}

int core_journal_destroyed(struct fayt_core *k, uint32_t sp_id)
{
    char line[32];
    int pos = snprintf(line, sizeof line, "D %u\n", sp_id);
    return core_journal_write(k, line, pos, -1);
}
