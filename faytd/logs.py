"""faytd's log: one line per event on stderr, with a timestamp and a level.

    --log-level debug|info|warning|error   (default info; -v is debug)
    --log-format text|json                 (default text)

text:  2026-12-05T13:10:02.418Z faytd INFO restored 2 share-points
json:  {"time": "2026-12-05T13:10:02.418Z", "level": "INFO", "logger": "faytd",
        "message": "restored 2 share-points"}           (one object per line)

A traceback (log.exception) is part of its record: indented lines after a
text line, the "exc" key of a JSON one, so a JSON log stays one object per
line.  Times are UTC.
"""
import json
import logging
import time

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


def _utc(record):
    t = time.gmtime(record.created)
    return "%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", t), int(record.msecs))


class TextFormatter(logging.Formatter):
    def format(self, record):
        line = "%s %s %s %s" % (_utc(record), record.name, record.levelname,
                                record.getMessage())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info).rstrip()
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record):
        out = {"time": _utc(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup(level, fmt, stream):
    """Route the "faytd" and "libportal" loggers (and anything else that
    propagates to the root logger) to stream."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
