"""The launch caches (`launch.launch` and `launch.BOUND`, used by `function._launch`): after the first launch of a
specialization, the compiled kernel is launched directly, with every argument in signature order; anything Triton
specializes on (a tensor's dtype or 16-byte alignment, an integer's being 1 or a multiple of 16, a compile-time size,
warps, stages, the register cap) compiles anew. Compiled kernels need a GPU, so a stand-in records what Triton would
have been asked to do."""

from types import SimpleNamespace

import pytest
import torch

from flash_gsa.ops.triton import config, function, launch


class _Compiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):  # like Triton's CompiledKernel, which reads grid[0], grid[1] and grid[2]
        return lambda *args: self.log.append(("direct", (grid[0], grid[1], grid[2]), args))


class _Kernel:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` compiles (recorded) and returns the compiled one."""

    def __init__(self, name, arg_names):
        self.fn = SimpleNamespace(__name__=name)
        self.arg_names = arg_names
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("compile", grid, args, kwargs))
            return _Compiled(self.log)

        return run


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "COMPILED", {})
    monkeypatch.setattr(launch, "BOUND", {})
    monkeypatch.setattr(function, "BOUND", launch.BOUND)
    return _Kernel("chunk_output_kernel", ["x", "y", "n", "scale", "K", "V", "BK", "BV"])


def test_second_launch_is_direct_with_constexprs_in_signature_order(kernel):
    x, y = torch.randn(64), torch.randn(64)
    sizes = dict(K=64, V=32, G=2)  # G: not taken by this kernel
    sig = function.signature(sizes, (x, y, 7))
    function._launch(kernel, (3, 1), sig, sizes, x, y, 7, 0.5)
    function._launch(kernel, (5, 2), sig, sizes, x, y, 7, 0.25)
    (first, *_), second = kernel.log
    assert first == "compile"
    bk, bv = min(config.TILE["output"], 64), max(config.MIN_TILE_BYTES // 4, 32)  # fp32 arguments
    assert kernel.log[0][3] == dict(K=64, V=32, BK=bk, BV=bv, num_warps=config.NUM_WARPS["output"],
                                    num_stages=config.NUM_STAGES["output"], maxnreg=config.MAX_REGISTERS["output"])
    assert second == ("direct", (5, 2, 1), (x, y, 7, 0.25, 64, 32, bk, bv))


@pytest.mark.parametrize("change", ["dtype", "alignment", "int_one", "int_16", "constexpr", "warps", "registers"])
def test_what_triton_specializes_on_compiles_anew(kernel, monkeypatch, change):
    buf = torch.randn(128)
    x, y, n, sizes = buf[:64], torch.randn(64), 7, dict(K=64, V=64)
    function._launch(kernel, (1,), function.signature(sizes, (x, y, n)), sizes, x, y, n, 1.0)
    if change == "dtype":
        y = y.double()
    elif change == "alignment":
        x = buf[1:65]  # 4 bytes past a 16-byte boundary
    elif change == "int_one":
        n = 1
    elif change == "int_16":
        n = 32
    elif change == "constexpr":
        sizes = dict(K=128, V=64)
    elif change == "warps":
        monkeypatch.setitem(config.NUM_WARPS, "output", 8)
    else:
        monkeypatch.setitem(config.MAX_REGISTERS, "output", 128)
    for _ in range(2):
        function._launch(kernel, (1,), function.signature(sizes, (x, y, n)), sizes, x, y, n, 1.0)
    assert [entry[0] for entry in kernel.log] == ["compile", "compile", "direct"]


def test_a_known_signature_skips_the_arguments(kernel, monkeypatch):
    """Once a (kernel, signature, sizes, tunables) key has launched, later launches under it take the kept kernel
    without working out the arguments' specialization; a key Triton has compiled for under another signature (here a
    float argument's value, which Triton does not specialize on) shares the compiled kernel."""
    x, y, sizes = torch.randn(64), torch.randn(64), dict(K=64, V=32)
    sig = function.signature(sizes, (x, y))
    function._launch(kernel, (1,), sig, sizes, x, y, 7, 0.5)

    def fail(_):
        raise AssertionError("the arguments were looked at again")

    with monkeypatch.context() as m:
        m.setattr(launch, "specialization", fail)
        function._launch(kernel, (2,), sig, sizes, x, y, 7, 0.25)
    function._launch(kernel, (3,), function.signature(sizes, (x, y), "other"), sizes, x, y, 7, 0.75)
    assert [entry[0] for entry in kernel.log] == ["compile", "direct", "direct"]
    assert len(launch.COMPILED) == 1 and len(launch.BOUND) == 2


def test_interpreter_takes_tritons_path_every_time(kernel, monkeypatch):
    monkeypatch.setattr(launch, "INTERPRET", True)
    x = torch.randn(64)
    for _ in range(2):
        function._launch(kernel, (1,), function.signature(dict(K=32, V=32), (x, x, 3)), dict(K=32, V=32), x, x, 3,
                         1.0)
    assert [entry[0] for entry in kernel.log] == ["compile", "compile"] and not launch.BOUND


class _Launcher:
    """Triton 3.6's CudaLauncher as `launch._direct` uses it: `launch` is the C function, whose leading arguments are
    (grid x, y, z, stream, function, cooperative, pdl, global scratch, profile scratch, metadata, launch metadata,
    enter hook, exit hook), then the kernel's arguments."""

    def __init__(self, log, scratch=0):
        self.log, self.global_scratch_size, self.profile_scratch_size = log, scratch, 0
        self.launch_cooperative_grid, self.launch_pdl = False, True
        self.launch = lambda *a: log.append(("c_launch", a))


class _Compiled36(_Compiled):
    def __init__(self, log, scratch=0):
        super().__init__(log)
        self.run, self.function, self.packed_metadata = _Launcher(log, scratch), 1234, (4, 1, 0)

    def _init_handles(self):
        pass


@pytest.mark.parametrize("case", ["plain", "scratch", "hook"])
def test_direct_launch_calls_the_c_launcher_with_tritons_leading_arguments(kernel, monkeypatch, case):
    from triton import knobs

    compiled = _Compiled36(kernel.log, 256 if case == "scratch" else 0)
    if case == "hook":  # a profiler's launch hook: Triton's runner calls it, so launches go there
        hook = knobs.HookChain()
        hook.add(lambda *args: None)
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
    compile_calls = []

    class K(_Kernel):
        def __getitem__(self, grid):
            return lambda *args, **kwargs: compile_calls.append(grid) or compiled

    k = K("chunk_output_kernel", kernel.arg_names)
    k.log = kernel.log
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 77, raising=False)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)), raising=False)
    x, y = torch.randn(64), torch.randn(64)
    sizes = dict(K=64, V=32)
    sig = function.signature(sizes, (x, y, 7))
    function._launch(k, (3, 2), sig, sizes, x, y, 7, 0.5)
    function._launch(k, (5,), sig, sizes, x, y, 7, 0.25)
    assert compile_calls == [(3, 2)]
    bk, bv = min(config.TILE["output"], 64), max(config.MIN_TILE_BYTES // 4, 32)  # fp32 arguments
    if case != "plain":  # a kernel that needs scratch memory, or a hook: through Triton's runner
        assert kernel.log == [("direct", (5, 1, 1), (x, y, 7, 0.25, 64, 32, bk, bv))]
    else:
        assert kernel.log == [("c_launch", (5, 1, 1, 77, 1234, False, True, None, None, (4, 1, 0), None, None, None,
                                            x, y, 7, 0.25, 64, 32, bk, bv))]


@pytest.mark.parametrize("fits_at", [2, 1, 0])
def test_too_much_shared_memory_takes_fewer_stages(kernel, monkeypatch, fits_at):
    """A first launch that fails with OutOfResources (more shared memory than the GPU has) compiles again with one
    pipeline stage fewer, down to one; later launches of that specialization go straight to the kernel that fit. A
    kernel that does not fit at one stage raises."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setitem(config.NUM_STAGES, "output", 3)

    class K(_Kernel):
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.log.append(("compile", kwargs["num_stages"]))
                if kwargs["num_stages"] > fits_at:
                    raise OutOfResources(240_000 * kwargs["num_stages"], 232_448, "shared memory")
                return _Compiled(self.log)

            return run

    k = K("chunk_output_kernel", kernel.arg_names)
    x = torch.randn(64)
    if fits_at == 0:
        with pytest.raises(OutOfResources):
            function._launch(k, (1,), function.signature(dict(K=32, V=32), (x, x, 3)), dict(K=32, V=32), x, x, 3,
                             1.0)
        assert k.log == [("compile", 3), ("compile", 2), ("compile", 1)]
        return
    sizes = dict(K=32, V=32)
    sig = function.signature(sizes, (x, x, 3))
    function._launch(k, (1,), sig, sizes, x, x, 3, 1.0)
    function._launch(k, (2,), sig, sizes, x, x, 3, 1.0)
    tried = [("compile", n) for n in range(3, fits_at - 1, -1)]
    assert k.log[:-1] == tried and k.log[-1][0] == "direct" and k.log[-1][1] == (2, 1, 1)


class _KeepsNothing(dict):
    """A launch.BOUND that keeps nothing: every launch works out its specialization from its arguments."""

    def __setitem__(self, key, value):
        pass


def _launch_log(monkeypatch, bound: dict) -> list:
    """Forward and backward of the triton backend on CPU tensors for several shapes, dtypes, alignments, states and
    tunables (some twice), with Triton's compilation replaced by a stand-in (nothing runs). Returns, per launch in
    order: the kernel's name, the runtime arguments' specialization and the compile-time arguments of the kernel that
    was launched (as compiled), and the specialization of the arguments it was launched with."""
    from flash_gsa import gsa

    log = []

    class Compiled:
        def __init__(self, spec):
            self.spec = spec

        def __getitem__(self, grid):
            return lambda *args: log.append((*self.spec, tuple(map(launch.specialization, args[:len(self.spec[1])]))))

    def getitem(self, grid):
        def compile_and_launch(*args, **kwargs):
            spec = (self.fn.__name__, tuple(map(launch.specialization, args)), tuple(sorted(kwargs.items())))
            log.append((*spec, spec[1]))
            return Compiled(spec)

        return compile_and_launch

    # the kernels' class: JITFunction, or the interpreter's stand-in for it under TRITON_INTERPRET=1
    monkeypatch.setattr(type(function.chunk_output_kernel), "__getitem__", getitem)
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "COMPILED", {})
    monkeypatch.setattr(launch, "BOUND", bound)
    monkeypatch.setattr(function, "BOUND", bound)

    def run(dtype=torch.bfloat16, K=32, V=32, HQ=2, H=2, varlen=False, misaligned=False, state=False):
        torch.manual_seed(0)
        B, T, M = (1, 96, 16) if varlen else (2, 64, 16)
        q = torch.randn(B * T * HQ * K + 1, dtype=dtype)[int(misaligned):][:B * T * HQ * K].view(B, T, HQ, K)
        k, v = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, V, dtype=dtype)
        g = -torch.rand(B, T, H, M, dtype=dtype)
        xs = [x.requires_grad_() for x in (q, k, v, g)]
        cu = torch.tensor([0, 40, 96], dtype=torch.int32) if varlen else None
        n = 2 if varlen else B
        h0 = (torch.zeros(n, H, K, M), torch.zeros(n, H, M, V)) if state else None
        o, final = gsa(*xs, initial_state=h0, output_final_state=state, cu_seqlens=cu, backend="triton")
        loss = o.float().sum() + (final[1].sum() if state else 0)
        loss.backward()

    run()
    run()
    run(dtype=torch.float32)
    run(K=64, V=32)
    run(varlen=True, HQ=4)
    run(misaligned=True)
    run(state=True)
    with monkeypatch.context() as m:
        m.setitem(config.NUM_WARPS, "output", 8)
        run()
    run()
    return log


def test_bound_launches_what_the_per_argument_path_launches(monkeypatch):
    """The launches of real forward and backward calls, through launch.BOUND (a known call signature skips the
    arguments), take the same compiled kernels as when every launch works out its specialization from its arguments;
    and each launched kernel was compiled for arguments that specialize as the ones it is launched with."""
    with monkeypatch.context() as m:
        per_argument = _launch_log(m, _KeepsNothing())
    bound = {}
    through_bound = _launch_log(monkeypatch, bound)
    assert len(through_bound) == len(per_argument) > 50
    assert [entry[:3] for entry in through_bound] == [entry[:3] for entry in per_argument]
    assert all(compiled_for == launched_with for _, compiled_for, _, launched_with in through_bound)
    # the repeated calls (the second and the last: nine launches each) were taken from BOUND
    assert 0 < len(bound) <= len(through_bound) - 18
