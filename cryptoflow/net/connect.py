"""One line for a failed connect that names its cause and the shard's source IP.

A connect from a shard's `source_ip` that is not an address of this host fails in
`bind()` with EADDRNOTAVAIL, but trio and httpx report only their outer message ("all
attempts to connect to 127.0.0.1:443 failed"): the cause sits two or three exceptions
down the `__cause__` chain, inside an ExceptionGroup. The REST client (`net/http.py`)
and the WebSocket client (`net/ws.py`) both reword their connect errors with
`describe_connect_failure`, so a log line says which address is wrong and why.
"""

from __future__ import annotations

import errno

#: the errno of a bind to an address the host does not have
_NOT_HERE = errno.EADDRNOTAVAIL


def describe_connect_failure(exc: BaseException, source_ip: str | None) -> str:
    """`exc`'s message, followed by the operating-system error under it (its errno
    name) and, when one was bound, the source IP; a source IP that is not on this host
    is said so in words."""
    outer = str(exc) or type(exc).__name__
    root = _root_os_error(exc)
    if root is None:
        return f"{outer} (from source IP {source_ip})" if source_ip else outer
    cause = f"{errno.errorcode.get(root.errno or 0, root.errno)}: {root.strerror or root}"
    if source_ip and root.errno == _NOT_HERE:
        return f"{outer}: source IP {source_ip} is not an address of this host ({cause})"
    if source_ip:
        return f"{outer} (from source IP {source_ip}: {cause})"
    return f"{outer} ({cause})"


def _root_os_error(exc: BaseException) -> OSError | None:
    """The OSError with an errno deepest under `exc` (an EADDRNOTAVAIL one first)."""
    found: list[OSError] = []
    stack: list[BaseException] = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            found.append(e)
        if isinstance(e, BaseExceptionGroup):
            stack.extend(reversed(e.exceptions))
        nxt = e.__cause__ or e.__context__
        if nxt is not None:
            stack.append(nxt)
    for e in found:
        if e.errno == _NOT_HERE:
            return e
    return found[-1] if found else None
