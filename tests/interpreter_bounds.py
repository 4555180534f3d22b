"""Out-of-bounds checks for kernels run by Triton's interpreter (TRITON_INTERPRET=1), which reads and writes raw
memory without any: an unmasked address outside every tensor of the launch goes unnoticed there (and may fault, or
read another buffer, on a GPU). `checked_accesses` records, for each load and store, the addresses that fall outside
every tensor argument of the launch doing it."""

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import triton.runtime.interpreter as interpreter


@contextlib.contextmanager
def checked_accesses() -> Iterator[list[tuple[str, str, int]]]:
    """Within the block, every interpreted launch is checked; yields the list of violations, one (kernel, "load" or
    "store", number of out-of-bounds elements) per offending access."""
    violations: list[tuple[str, str, int]] = []
    launch: dict = {"kernel": None, "ranges": []}
    run, load, store = (interpreter.GridExecutor.__call__, interpreter.InterpreterBuilder.create_masked_load,
                        interpreter.InterpreterBuilder.create_masked_store)

    def checked_run(self, *args, **kwargs):
        storages = [a.untyped_storage() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        launch["kernel"] = getattr(self.fn, "__name__", "?")
        launch["ranges"] = [(st.data_ptr(), st.data_ptr() + st.nbytes()) for st in storages]
        return run(self, *args, **kwargs)

    def check(ptrs, mask, size: int, what: str) -> None:
        addresses = ptrs.data.astype(np.uint64)[np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)]
        inside = np.zeros(addresses.shape, dtype=bool)
        for lo, hi in launch["ranges"]:
            inside |= (addresses >= lo) & (addresses + size <= hi)
        if not inside.all():
            violations.append((launch["kernel"], what, int((~inside).sum())))

    def checked_load(self, ptrs, mask, other, *rest):
        check(ptrs, mask, np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize, "load")
        return load(self, ptrs, mask, other, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        check(ptrs, mask, value.data.dtype.itemsize, "store")
        return store(self, ptrs, value, mask, *rest)

    interpreter.GridExecutor.__call__ = checked_run
    interpreter.InterpreterBuilder.create_masked_load = checked_load
    interpreter.InterpreterBuilder.create_masked_store = checked_store
    try:
        yield violations
    finally:
        interpreter.GridExecutor.__call__ = run
        interpreter.InterpreterBuilder.create_masked_load = load
        interpreter.InterpreterBuilder.create_masked_store = store
