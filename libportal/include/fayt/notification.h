/* fayt/notification.h: one notification slot, as the specification writes it.
 * A context has FAYT_NOTIFICATION_SLOTS of them.
 */
#ifndef FAYT_NOTIFICATION_H
#define FAYT_NOTIFICATION_H

#define FAYT_NOTIFICATION_SLOTS 64

struct NotificationAction {
    void (*handler)(void *, int, int);
} __attribute__((packed));

#endif
