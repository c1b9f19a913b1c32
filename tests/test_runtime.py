"""medjax.runtime: glibc allocator tuning, its switches, and its effects (huge pages and freed blocks kept on
the heap after a re-exec; or, with mallopt, freed big blocks kept), XLA's flags, and JAX's CPU dispatch."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from medjax import runtime

# Allocates and frees a 256 MiB block in a fresh process and reports its resident set and huge pages
# before and after the free and after release_free_memory() (in MiB), after tune_allocator() saw the
# environment given as argv[1] (or the process's own, which lets it re-execute the process, when argv[1]
# is "real").
_PROBE = textwrap.dedent("""
    import ctypes, json, os, sys
    from medjax import runtime
    if sys.argv[1] == "real":
        status = runtime.tune_allocator()
    else:
        status = runtime.tune_allocator(json.loads(sys.argv[1]), reexec=False)
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def huge_mib():
        with open("/proc/self/smaps_rollup") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("AnonHugePages:")) / 1024

    size = 256 * 2**20
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # Touch every page.
    held, huge = rss_mib(), huge_mib()
    libc.free(block)
    after_free = rss_mib()
    runtime.release_free_memory()
    # A block above 1 GiB, never touched (no memory used): from the heap, below the program break, or
    # mapped on its own far above it.
    libc.sbrk.restype = ctypes.c_void_p
    big = libc.malloc(5 * 2**28)
    big_in_heap = big is not None and big < libc.sbrk(0)
    libc.free(big)
    print(json.dumps({"status": status, "held": held, "huge": huge, "after_free": after_free,
                      "big_block_in_heap": big_in_heap,
                      "after_release": rss_mib(), "argv": sys.argv[1:],
                      "tunables": os.environ.get("GLIBC_TUNABLES")}))
    """)


def _run_fresh_process(code: str, *args: str, drop=(), **env: str) -> dict:
    """Runs `code` (with `args`) in a fresh CPU-only Python process whose environment is this one's without
    the variables in `drop` and with `env`; returns the JSON object it printed last."""
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=dict(environ, JAX_PLATFORMS="cpu", **env),
    ).stdout
    return json.loads(out.splitlines()[-1])


def _probe(environ) -> dict:
    return _run_fresh_process(_PROBE, environ if environ == "real" else json.dumps(environ), "--flag=x")


def test_switch_and_user_settings_leave_the_allocator_alone():
    assert runtime.tune_allocator({runtime.ENV_SWITCH: "0"}) == f"unchanged ({runtime.ENV_SWITCH}=0)"
    assert runtime.tune_allocator({"MALLOC_ARENA_MAX": "2"}).startswith("unchanged (glibc malloc variables")
    assert runtime.tune_allocator({"LD_PRELOAD": "/usr/lib/libtcmalloc.so"}).startswith("unchanged")


@pytest.mark.skipif(
    runtime._thp_mode() != "madvise" or runtime._glibc_version() < (2, 35),
    reason="needs transparent huge pages in 'madvise' mode and glibc >= 2.35",
)
def test_reexecuted_process_gets_huge_pages_and_keeps_freed_blocks_until_released():
    tuned = _probe("real")
    assert tuned["status"].startswith(f"GLIBC_TUNABLES={runtime.TUNABLES}"), tuned
    assert tuned["tunables"] == runtime.TUNABLES
    assert tuned["argv"] == ["real", "--flag=x"]  # Same command line after the re-exec.
    assert tuned["huge"] > 0, tuned  # Faulted in 2 MiB at a time.
    assert tuned["held"] - tuned["after_free"] < 16, tuned  # Kept on the heap for the next step,
    assert tuned["after_free"] - tuned["after_release"] > 200, tuned  # until release_free_memory().
    assert tuned["big_block_in_heap"], tuned  # Blocks of any size, so that none is mapped afresh each step.
    # Without the switch's consent nothing happens, and a user's own tunables are left alone.
    assert _probe({runtime.ENV_SWITCH: "0"})["huge"] == 0
    assert runtime.tune_allocator({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}).startswith("unchanged")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or runtime._thp_mode() == "always",
    reason="glibc's mallopt is Linux-only; with THP 'always' nothing is tuned",
)
def test_mallopt_process_keeps_freed_memory_and_default_returns_it():
    tuned = _probe({})
    for name, (_, value) in runtime.SETTINGS.items():
        assert f"{name}={value}" in tuned["status"]
    assert "refused" not in tuned["status"]
    # Kept for the next step: the freed 256 MiB block stays resident instead of being unmapped.
    assert tuned["held"] - tuned["after_free"] < 16, tuned

    default = _probe({runtime.ENV_SWITCH: "0"})
    assert default["status"].startswith("unchanged")
    assert default["held"] - default["after_free"] > 200, default


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux-only")
def test_release_free_memory_returns_freed_heap_blocks():
    code = textwrap.dedent("""
        import ctypes, json, os
        from medjax import runtime
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = (ctypes.c_size_t,)
        libc.free.argtypes = (ctypes.c_void_p,)

        def rss_mib():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

        blocks = [libc.malloc(4096) for _ in range(50_000)]  # 200 MiB of small heap blocks.
        for block in blocks:
            ctypes.memset(block, 1, 4096)
        keep = libc.malloc(4096)  # Above them all: plain trimming at the heap's top cannot return them.
        for block in blocks:
            libc.free(block)
        held = rss_mib()
        released = runtime.release_free_memory()
        print(json.dumps({"held": held, "after": rss_mib(), "released": released}))
        """)
    result = _run_fresh_process(code)
    assert result["released"] and result["held"] - result["after"] > 150, result


def test_failed_reexec_falls_back_to_mallopt_and_restores_the_environment(monkeypatch):
    def refuse(*args):
        raise OSError("exec refused")

    for name in (runtime.ENV_SWITCH, "GLIBC_TUNABLES", "LD_PRELOAD", *runtime._GLIBC_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(runtime, "_thp_mode", lambda: "madvise")
    monkeypatch.setattr(runtime, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(runtime, "_apply", lambda: "glibc mallopt (stub)")
    monkeypatch.setattr(runtime.os, "execv", refuse)
    assert runtime.tune_allocator() == "glibc mallopt (stub) (re-exec for huge pages failed)"
    assert "GLIBC_TUNABLES" not in runtime.os.environ and runtime._REEXEC_MARK not in runtime.os.environ


def test_tune_xla_adds_its_flags_once_and_respects_the_user():
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    status = runtime.tune_xla(environ)
    assert environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {runtime.XLA_CPU_FLAGS}"
    assert status == f"XLA_FLAGS={environ['XLA_FLAGS']}" == runtime.xla_status
    assert runtime.tune_xla(environ).startswith("unchanged (XLA_FLAGS sets")  # The flags are there now.
    assert environ["XLA_FLAGS"].count(runtime.YNN_FUSION_FLAG) == 1
    own = {"XLA_FLAGS": f"--{runtime.YNN_FUSION_FLAG}=+individual_convolution"}
    runtime.tune_xla(own)  # The user's value stays; only flags the user did not name are added.
    assert own["XLA_FLAGS"].split()[0].endswith("+individual_convolution")
    assert own["XLA_FLAGS"].count(runtime.YNN_FUSION_FLAG) == 1
    switched_off = {runtime.XLA_SWITCH: "0"}
    assert runtime.tune_xla(switched_off) == f"unchanged ({runtime.XLA_SWITCH}=0)"
    assert "XLA_FLAGS" not in switched_off


def test_xla_own_convolutions_follows_the_ynn_fusion_flag():
    flag = f"--{runtime.YNN_FUSION_FLAG}"
    assert runtime.xla_own_convolutions({"XLA_FLAGS": runtime.XLA_CPU_FLAGS})
    assert runtime.xla_own_convolutions(
        {"XLA_FLAGS": f"--xla_dump_to=/tmp/x {flag}=-individual_dot,-individual_convolution"}
    )
    assert not runtime.xla_own_convolutions({})
    assert not runtime.xla_own_convolutions({"XLA_FLAGS": "--xla_dump_to=/tmp/x"})
    assert not runtime.xla_own_convolutions({"XLA_FLAGS": f"{flag}=+individual_convolution"})
    assert not runtime.xla_own_convolutions({"XLA_FLAGS": f"{flag}=-individual_convolution {flag}=default"})


def test_vector_width_flag_only_on_avx512_cpus(monkeypatch):
    monkeypatch.setattr(runtime, "_has_avx512", lambda: True)
    assert runtime._xla_cpu_flags()[runtime.VECTOR_WIDTH_FLAG] == "512"
    monkeypatch.setattr(runtime, "_has_avx512", lambda: False)
    assert runtime.VECTOR_WIDTH_FLAG not in runtime._xla_cpu_flags()
    assert runtime.YNN_FUSION_FLAG in runtime._xla_cpu_flags()


def test_cpu_compiler_options_are_per_model_leave_the_user_s_flags_and_compile(monkeypatch):
    import jax
    import jax.numpy as jnp

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(runtime.XLA_SWITCH, raising=False)
    options = runtime.cpu_compiler_options("paper_cnn")
    assert options == {
        runtime.FUSION_EMITTERS_FLAG: False,
        runtime.YNN_FUSION_FLAG: runtime.YNN_REDUCTIONS_ONLY,
    }
    assert runtime.cpu_compiler_options("resnet18") == {}  # Measured slower with them: XLA's default.
    # This jaxlib knows the options and their values (an unknown one is an error) and compiles with them.
    assert float(jax.jit(lambda x: jnp.sum(jnp.tanh(x)), compiler_options=options)(jnp.zeros(8))) == 0.0
    with pytest.raises(Exception, match="No such compile option"):
        jax.jit(lambda x: x, compiler_options={"xla_cpu_no_such_option": False})(jnp.zeros(2))
    with pytest.raises(Exception, match="not a valid enum value"):
        jax.jit(lambda x: x, compiler_options={runtime.YNN_FUSION_FLAG: "-individual_dot"})(jnp.zeros(2))
    # tune_xla's own XLA_FLAGS value is refined per model; a value of the user's stands.
    monkeypatch.setenv("XLA_FLAGS", runtime.XLA_CPU_FLAGS)
    assert runtime.cpu_compiler_options("paper_cnn") == options
    monkeypatch.setenv("XLA_FLAGS", f"--{runtime.YNN_FUSION_FLAG}=-individual_dot --xla_dump_to=/tmp/x")
    assert runtime.cpu_compiler_options("paper_cnn") == {runtime.FUSION_EMITTERS_FLAG: False}
    monkeypatch.setenv("XLA_FLAGS", f"--{runtime.FUSION_EMITTERS_FLAG}=true")
    assert runtime.cpu_compiler_options("paper_cnn") == {runtime.YNN_FUSION_FLAG: runtime.YNN_REDUCTIONS_ONLY}
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv(runtime.XLA_SWITCH, "0")
    assert runtime.cpu_compiler_options("paper_cnn") == {}


def test_tune_xla_is_too_late_once_jax_has_started(monkeypatch):
    import jax

    jax.devices()  # Starts the backend, if no earlier test did.
    monkeypatch.delenv(runtime.XLA_SWITCH, raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert runtime.tune_xla() == "unchanged (JAX's backend had already started)"
    assert "XLA_FLAGS" not in runtime.os.environ


def test_tuned_xla_compiles_convolutions_natively_and_dots_with_its_library():
    """The flag does what tune_xla's docstring says in this jaxlib: the convolution is XLA's own op, the
    matmul and the reduction still YNNPACK fusions; with the paper CNN's compile options the matmul is
    XLA's own too (if a jaxlib renames or drops the flag or its values, this fails)."""
    code = textwrap.dedent("""
        import json
        from medjax import runtime
        status = runtime.tune_xla()
        import jax, jax.numpy as jnp
        from jax import lax

        def f(x, k, a):
            y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y, a @ a, jnp.sum(a * a, axis=0)

        def compiled_ops(**options):
            args = (jnp.ones((8, 16, 16, 16)), jnp.ones((3, 3, 16, 32)), jnp.ones((64, 64)))
            hlo = jax.jit(f, **options).lower(*args).compile().as_text()
            lines = [line for line in hlo.splitlines() if "op_name=" in line]

            def opcode(line):  # "%name = f32[...]{...} convolution(%x, ...), ..." -> "convolution"
                return line.split(" = ", 1)[1].split("(", 1)[0].split()[-1]

            return {
                "conv": [opcode(line) for line in lines if "conv_general" in line],
                "dot_in_ynn": any("ynn_fusion" in line and "dot_general" in line for line in lines),
                "reduce_in_ynn": any("ynn_fusion" in line and "reduce_sum" in line for line in lines),
            }

        print(json.dumps({
            "status": status,
            "default": compiled_ops(),
            "paper_cnn": compiled_ops(compiler_options=runtime.cpu_compiler_options("paper_cnn")),
        }))
        """)
    result = _run_fresh_process(code, drop=("XLA_FLAGS", runtime.XLA_SWITCH))
    assert result["status"].startswith("XLA_FLAGS="), result
    assert result["default"] == {"conv": ["convolution"], "dot_in_ynn": True, "reduce_in_ynn": True}, result
    # The paper CNN's per-model option leaves matmuls to XLA too, and reductions to YNNPACK.
    assert result["paper_cnn"] == {
        "conv": ["convolution"],
        "dot_in_ynn": False,
        "reduce_in_ynn": True,
    }, result


def test_tune_dispatch_needs_the_tunables_a_live_switch_and_an_unstarted_backend(monkeypatch):
    import jax

    monkeypatch.delenv(runtime.DISPATCH_SWITCH, raising=False)
    monkeypatch.setattr(runtime, "status", "glibc mallopt M_TRIM_THRESHOLD=2147483647")
    assert runtime.tune_dispatch() == "unchanged (the allocator's tunables are not set)"
    monkeypatch.setattr(
        runtime, "status", f"GLIBC_TUNABLES={runtime.TUNABLES} (transparent huge pages: madvise)"
    )
    jax.devices()  # Starts the backend, if no earlier test did.
    assert runtime.tune_dispatch() == "unchanged (JAX's backend had already started)"
    monkeypatch.setenv(runtime.DISPATCH_SWITCH, "0")
    assert runtime.tune_dispatch() == f"unchanged ({runtime.DISPATCH_SWITCH}=0)" == runtime.dispatch_status
    assert jax.config.values["jax_cpu_enable_async_dispatch"]  # This process was left alone throughout.


# Trains the paper CNN (batch 128) for 20 steps in a fresh process tuned as medjax's entry points tune
# theirs, and reports the median page faults of the last 10 steps (the heap settles within ~10). XLA:CPU
# allocates each step's temporary buffer (~116 MB here) on the thread that runs the step.
_DISPATCH_PROBE = textwrap.dedent("""
    import functools, json, resource, statistics
    from medjax import runtime
    runtime.tune_process()
    import jax, numpy as np
    from configs import base
    from medjax import models, steps

    config = base.get_config()
    model = models.create_model(config.model, 6)
    tx = steps.create_optimizer(config.train, 1000)
    rng = np.random.default_rng(0)
    batch = jax.device_put({"image": rng.integers(0, 256, (128, 64, 64, 1), dtype=np.uint8),
                            "label": rng.integers(0, 6, 128).astype(np.int32)})
    state = jax.jit(functools.partial(steps.init_state, model, tx, image_shape=(64, 64, 1)))(jax.random.key(0))
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, dropout_key=jax.random.key(1),
                                     mean=config.data.mean, std=config.data.std, label_smoothing=0.0),
                   donate_argnums=0)
    faults = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        state, _ = step(state, batch)
        jax.block_until_ready(state)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"dispatch": runtime.dispatch_status,
                      "asynchronous": jax.config.values["jax_cpu_enable_async_dispatch"],
                      "faults_per_step": statistics.median(faults[10:])}))
    """)


@pytest.mark.skipif(
    runtime._thp_mode() != "madvise" or runtime._glibc_version() < (2, 35),
    reason="needs transparent huge pages in 'madvise' mode and glibc >= 2.35",
)
def test_inline_dispatch_reuses_the_step_buffers_instead_of_faulting_them_in_each_step():
    tuned, asynchronous = (
        _run_fresh_process(
            _DISPATCH_PROBE, drop=("GLIBC_TUNABLES", runtime.ENV_SWITCH), **{runtime.DISPATCH_SWITCH: switch}
        )
        for switch in ("1", "0")
    )
    assert tuned["dispatch"] == "JAX runs CPU computations on the calling thread", tuned
    assert tuned["asynchronous"] is False and asynchronous["asynchronous"] is True
    # Measured here: 2-57 vs 300-560 faults a step (55 of them huge pages) once the heap has settled.
    assert tuned["faults_per_step"] < 100 < asynchronous["faults_per_step"], (tuned, asynchronous)
