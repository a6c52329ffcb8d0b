"""Type aliases of the public API's annotations (docs/api.md).

Plain aliases, evaluated at import (Python 3.10 reads `X | Y`), so that
typing.get_type_hints() resolves every public signature at run time.
"""
from typing import Callable, Union

# A bytes-like argument: what the calls accept (they take memoryview(x).cast("B")).
Buffer = Union[bytes, bytearray, memoryview]
# A writable bytes-like argument (readinto).
WritableBuffer = Union[bytearray, memoryview]
# A name or identifier: str (UTF-8 encoded) or bytes.
Name = Union[str, bytes]
# A notification handler: handler(payload, index, sender) -> its return value
# (an int, or None for 0); payload is None for the stack-provider action.
Handler = Callable[[Union[bytes, None], int, int], Union[int, None]]
