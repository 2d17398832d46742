"""Which llama.cpp backends this process runs on: the best CPU variant this computer can run, and the GPU backends.

One of the three modules that touch llama.cpp (with llm.py and llm_quantize.py); this one speaks to ggml's backend
registry in libggml through ctypes, as llama-cpp-python has no bindings for it.

Our llama.cpp build (packaging/install-llama-cpp) makes every backend a loadable module next to libllama: one CPU
backend per instruction-set level (`libggml-cpu-haswell.so`, `-skylakex`, `-zen4`, `-sapphirerapids`...) and
`libggml-vulkan.so`. llama-cpp-python never loads them itself, and llama.cpp's own fallback searches only the
executable's folder and the current directory, so this module loads them explicitly, once, before
`llama_backend_init`.

The CPU variant. Each module scores itself with CPUID alone (ggml_backend_score: 0 = cannot run; otherwise
1 + one bit per instruction set it was compiled for). CPUID says what the processor has, not what the kernel
enabled: a CPU (or a hypervisor's CPUID) may report AMX or AVX-512 whose register state the kernel does not
manage, and code using them dies with SIGILL. So a variant is kept only if, on Linux, every instruction set of its
score is also in /proc/cpuinfo's flags (the kernel's view), and an AMX variant only if the kernel grants this
process the AMX tile state (arch_prctl(ARCH_REQ_XCOMP_PERM), which ggml's AMX code needs anyway). The best score
left wins. `OWL_LLAMA_CPU_VARIANT=haswell` (any runnable variant) forces a lower one, for tests and as a way out.

A build without run-time dispatch (e.g. OWL_LLAMA_CMAKE_ARGS for CUDA) has its backends linked in; then nothing is
loaded here and the report says "built-in".
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from owl_desktop.errors import EngineError

CPU_VARIANT_ENV = "OWL_LLAMA_CPU_VARIANT"

# ggml_backend_score() - 1 is a bit set of the x86 instruction sets a CPU variant was built for (ggml's
# ggml-cpu/arch/x86/cpu-feats.cpp); each needs these flags in /proc/cpuinfo.
_X86_SCORE_BITS: tuple[tuple[str, ...], ...] = (
    ("fma",),
    ("f16c",),
    ("sse4_2",),
    ("bmi2",),
    ("avx",),
    ("avx2",),
    ("avx_vnni",),
    ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    ("avx512vbmi",),
    ("avx512_bf16",),
    ("avx512_vnni",),
    ("amx_tile", "amx_int8"),
)
_AMX_BIT = 11
# instruction sets worth naming in a report, in ggml's spelling (its CPU backend lists more, e.g. OPENMP, REPACK)
_ISA_FEATURES = (
    "SSE3", "SSSE3", "AVX", "AVX_VNNI", "AVX2", "F16C", "FMA", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
    "AVX512_BF16", "AMX_INT8", "NEON", "ARM_FMA", "FP16_VA", "MATMUL_INT8", "SVE", "DOTPROD", "SME", "SME2",
)  # fmt: skip
_DEVICE_GPU, _DEVICE_IGPU = 1, 2


# Where a Linux machine has a GPU a driver can use: DRM render nodes (Mesa's Vulkan drivers, NVIDIA's open modules)
# and NVIDIA's and AMD's compute device nodes.
GPU_DEVICE_NODES = ("/dev/dri/renderD*", "/dev/nvidia[0-9]*", "/dev/kfd")
NO_GPU_NODE = "no GPU on this computer"


@dataclass(frozen=True)
class GpuDevice:
    backend: str  # "Vulkan", "CUDA", "Metal"...
    name: str  # ggml's device name, e.g. "Vulkan0"
    description: str  # e.g. "NVIDIA GeForce RTX 4070" or "llvmpipe (LLVM 15.0.6, 256 bits)"
    memory_mib: int
    integrated: bool


@dataclass(frozen=True)
class LlamaBackends:
    """What llama.cpp runs on in this process."""

    cpu_variant: str  # e.g. "zen4"; "built-in" for a build whose CPU backend is linked in
    cpu_features: tuple[str, ...]  # instruction sets the CPU code uses, e.g. ("AVX2", "AVX512", "AVX512_VNNI")
    cpu_variants: tuple[str, ...]  # every CPU variant of the build, best score first
    runnable_variants: tuple[str, ...]  # of those, the ones this computer can run
    gpu_backends: tuple[str, ...]  # GPU backends loaded, with or without a device, e.g. ("Vulkan",)
    gpu_devices: tuple[GpuDevice, ...]  # the devices they found; llama.cpp offloads to these
    unavailable: tuple[tuple[str, str], ...] = ()  # (module, why) for GPU backend modules that could not load here
    amx_trap: bool = False  # the CPU code has AMX kernels the kernel does not enable (a -march=native build only)

    @property
    def automatic_variant(self) -> str:
        """The CPU variant a process gets without OWL_LLAMA_CPU_VARIANT: the best runnable ("built-in" without
        run-time dispatch). Differs from cpu_variant where that variable forces another."""
        return self.runnable_variants[0] if self.runnable_variants else self.cpu_variant

    @property
    def gpu(self) -> GpuDevice | None:
        """The GPU llama.cpp will use (discrete before integrated, as llama.cpp picks), or None for CPU only."""
        discrete = [d for d in self.gpu_devices if not d.integrated]
        return (discrete or list(self.gpu_devices) or [None])[0]

    @property
    def cpu_isa(self) -> tuple[str, ...]:
        """The instruction sets of cpu_features worth naming (SSE3 and SSSE3 are on every x86-64 variant but x64)."""
        return tuple(f for f in self.cpu_features if f not in ("SSE3", "SSSE3"))

    def summary(self) -> str:
        """One line, e.g. "CPU zen4 (AVX2 AVX512 AVX512_VNNI AVX512_BF16) · GPU Vulkan: NVIDIA GeForce RTX 4070"."""
        cpu = f"CPU {self.cpu_variant}" + (f" ({' '.join(self.cpu_isa)})" if self.cpu_isa else "")
        gpu = self.gpu
        if gpu is not None:
            return f"{cpu} · GPU {gpu.backend}: {gpu.description}"
        why = [f"{name}: no device" for name in self.gpu_backends]
        why += [
            f"{module}: {NO_GPU_NODE if reason == NO_GPU_NODE else 'not loadable here'}"
            for module, reason in self.unavailable
        ]
        return f"{cpu} · GPU: none" + (f" ({'; '.join(why)})" if why else "")


_lock = threading.Lock()
_loaded: LlamaBackends | None = None


def lib_dir() -> Path:
    """The folder of libllama and its backends: the one llama-cpp-python loads from (LLAMA_CPP_LIB_PATH wins)."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    import llama_cpp

    return Path(llama_cpp.__file__).resolve().parent / "lib"


def _module_names() -> tuple[str, str]:
    """(prefix, extension) of ggml's backend modules on this platform."""
    return ("ggml-", ".dll") if sys.platform == "win32" else ("libggml-", ".so")


def _loaded_ggml(directory: Path) -> ctypes.CDLL:
    """The libggml that libllama itself uses. Its registry is the one llama.cpp reads; another copy has its own.

    The wheel holds libggml.so and libggml.so.0 as two files (wheels have no symlinks) and libllama links the
    second: opening the first by path would load a second copy. So ask the dynamic loader for what is already loaded.
    """
    import llama_cpp  # noqa: F401 - loads libllama, and with it libggml

    if sys.platform == "win32":
        return ctypes.CDLL(str(directory / "ggml.dll"))  # Windows keeps one module per name
    if sys.platform == "darwin":
        return ctypes.CDLL(str(directory / "libggml.dylib"))
    for name in sorted(p.name for p in directory.glob("libggml.so*")):  # libggml.so, libggml.so.0, ...
        try:
            return ctypes.CDLL(name, mode=os.RTLD_NOLOAD)  # by soname: only an already loaded library
        except OSError:
            continue
    return ctypes.CDLL(str(directory / "libggml.so"))


def _ggml(directory: Path) -> ctypes.CDLL:
    lib = _loaded_ggml(directory)
    vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    for fn, args, res in (
        ("ggml_backend_load", [cp], vp),
        ("ggml_backend_reg_count", [], sz),
        ("ggml_backend_reg_get", [sz], vp),
        ("ggml_backend_reg_name", [vp], cp),
        ("ggml_backend_reg_get_proc_address", [vp, cp], vp),
        ("ggml_backend_dev_count", [], sz),
        ("ggml_backend_dev_get", [sz], vp),
        ("ggml_backend_dev_name", [vp], cp),
        ("ggml_backend_dev_description", [vp], cp),
        ("ggml_backend_dev_type", [vp], ctypes.c_int),
        ("ggml_backend_dev_backend_reg", [vp], vp),
        ("ggml_backend_dev_memory", [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
    ):
        f = getattr(lib, fn)
        f.argtypes, f.restype = args, res
    return lib


def _close(lib: ctypes.CDLL) -> None:
    if sys.platform != "win32":
        import _ctypes

        _ctypes.dlclose(lib._handle)


def _self_score(path: Path) -> int:
    """ggml_backend_score() of a CPU variant module: 0 where this CPU lacks one of its instruction sets."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return 0
    try:
        fn = getattr(lib, "ggml_backend_score", None)
        if fn is None:
            return 0
        fn.restype = ctypes.c_int
        return int(fn())
    finally:
        _close(lib)


def _kernel_flags() -> set[str] | None:
    """The CPU flags the Linux kernel enabled (/proc/cpuinfo), or None where there is no such file."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _kernel_grants_amx() -> bool:
    """Whether Linux lets this process use the AMX tile registers (the request ggml's AMX code makes first)."""
    if not sys.platform.startswith("linux"):
        return sys.platform == "win32"  # Windows enables AMX state for every process where the CPU has it
    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(
        ctypes.c_long(sys_arch_prctl), ctypes.c_long(arch_req_xcomp_perm), ctypes.c_long(xfeature_xtiledata)
    )
    return rc == 0


def _runnable(score: int, flags: set[str] | None, x86: bool) -> bool:
    if score <= 0:
        return False
    if not x86:
        return True
    bits = score - 1
    for i, needed in enumerate(_X86_SCORE_BITS):
        if not bits & (1 << i):
            continue
        if flags is not None and not set(needed) <= flags:
            return False
        if i == _AMX_BIT and not _kernel_grants_amx():
            return False
    return True


def _choose_cpu_variant(directory: Path) -> tuple[str, Path, tuple[str, ...], tuple[str, ...]]:
    """(name, module path, every variant best first, runnable variants best first)."""
    prefix, ext = _module_names()
    modules = {p.name[len(prefix + "cpu-") : -len(ext)]: p for p in directory.glob(f"{prefix}cpu-*{ext}")}
    scores = {name: _self_score(path) for name, path in modules.items()}
    ranked = tuple(sorted(modules, key=lambda n: scores[n], reverse=True))
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    flags = _kernel_flags()
    runnable = tuple(n for n in ranked if _runnable(scores[n], flags, x86))
    plain = directory / f"{prefix}cpu{ext}"
    if not modules and plain.exists():  # dispatch without GGML_CPU_ALL_VARIANTS: one CPU module
        return "cpu", plain, ("cpu",), ("cpu",)
    forced = os.environ.get(CPU_VARIANT_ENV, "").strip()
    if forced:
        if forced not in modules:
            raise EngineError(f"{CPU_VARIANT_ENV}={forced}: this llama.cpp build has {', '.join(ranked)}")
        if forced not in runnable:
            raise EngineError(
                f"{CPU_VARIANT_ENV}={forced} cannot run on this computer; it can run {', '.join(runnable)}"
            )
        return forced, modules[forced], ranked, runnable
    if not runnable:
        raise EngineError(f"none of llama.cpp's CPU backends ({', '.join(ranked)}) can run on this computer")
    return runnable[0], modules[runnable[0]], ranked, runnable


def _features(ggml: ctypes.CDLL, reg: int) -> tuple[str, ...]:
    """The instruction sets a backend reports through its ggml_backend_get_features (compile time for the CPU)."""

    class Feature(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]

    addr = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
    if not addr:
        return ()
    get = ctypes.CFUNCTYPE(ctypes.POINTER(Feature), ctypes.c_void_p)(addr)
    found: list[str] = []
    feats = get(reg)
    i = 0
    while feats[i].name:
        name = feats[i].name.decode()
        if name in _ISA_FEATURES and feats[i].value == b"1":
            found.append(name)
        i += 1
    return tuple(found)


def _gpu_may_be_present() -> bool:
    """False on Linux when no GPU device node exists: loading the Vulkan module would only cost time and memory
    (the Vulkan loader maps every installed driver, Mesa's with its LLVM: ~60 MB resident) to find no device.
    GGML_VK_VISIBLE_DEVICES set (a CPU-type Vulkan device such as lavapipe asked for by name) always loads it."""
    if not sys.platform.startswith("linux") or os.environ.get("GGML_VK_VISIBLE_DEVICES"):
        return True
    return any(glob.glob(pattern) for pattern in GPU_DEVICE_NODES)


def _load_gpu_modules(ggml: ctypes.CDLL, directory: Path) -> list[tuple[str, str]]:
    """Load every non-CPU backend module (Vulkan, CUDA...); (module, why) for those that cannot load here."""
    prefix, ext = _module_names()
    modules = []
    for path in sorted(directory.glob(f"{prefix}*{ext}")):
        kind = path.name[len(prefix) : -len(ext)]
        if kind not in ("base", "cpu") and not kind.startswith("cpu-"):
            modules.append((kind, path))
    if not _gpu_may_be_present():
        return [(kind, NO_GPU_NODE) for kind, _path in modules]
    unavailable: list[tuple[str, str]] = []
    for kind, path in modules:
        try:  # a missing run-time (libvulkan.so.1, libcuda.so.1) is normal: say so once, quietly
            probe = ctypes.CDLL(str(path))
        except OSError as exc:
            unavailable.append((kind, str(exc)))
            continue
        if not ggml.ggml_backend_load(str(path).encode()):
            unavailable.append((kind, "did not initialise (no driver?)"))
        _close(probe)
    return unavailable


def _describe(
    ggml: ctypes.CDLL,
    variant: str,
    ranked: tuple[str, ...],
    runnable: tuple[str, ...],
    unavailable: list[tuple[str, str]],
) -> LlamaBackends:
    cpu_features: tuple[str, ...] = ()
    gpu_backends: list[str] = []
    for i in range(ggml.ggml_backend_reg_count()):
        reg = ggml.ggml_backend_reg_get(i)
        name = ggml.ggml_backend_reg_name(reg).decode()
        if name == "CPU":
            cpu_features = _features(ggml, reg)
        elif name not in ("BLAS", "RPC"):
            gpu_backends.append(name)
    devices = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        kind = ggml.ggml_backend_dev_type(dev)
        if kind not in (_DEVICE_GPU, _DEVICE_IGPU):
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(
            GpuDevice(
                backend=ggml.ggml_backend_reg_name(ggml.ggml_backend_dev_backend_reg(dev)).decode(),
                name=ggml.ggml_backend_dev_name(dev).decode(),
                description=ggml.ggml_backend_dev_description(dev).decode("utf-8", "replace"),
                memory_mib=total.value // (1 << 20),
                integrated=kind == _DEVICE_IGPU,
            )
        )
    return LlamaBackends(
        amx_trap="AMX_INT8" in cpu_features and not _kernel_grants_amx(),
        cpu_variant=variant,
        cpu_features=cpu_features,
        cpu_variants=ranked,
        runnable_variants=runnable,
        gpu_backends=tuple(gpu_backends),
        gpu_devices=tuple(devices),
        unavailable=tuple(unavailable),
    )


def device_memory(name: str) -> tuple[int, int] | None:
    """(free, total) bytes of the loaded ggml device `name` now (e.g. "Vulkan0", "CUDA0"); None when no device of
    that name is loaded (load_backends first)."""
    ggml = _ggml(lib_dir())
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if ggml.ggml_backend_dev_name(dev).decode() == name:
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            return free.value, total.value
    return None


def load_backends(*, gpu: bool = True) -> LlamaBackends:
    """Load llama.cpp's backends once per process (before llama_backend_init) and say which are in use.

    `gpu=False` loads the CPU backend only (the quantizer's child process needs no GPU).
    Raises EngineError when no CPU backend can run, or OWL_LLAMA_CPU_VARIANT names one that cannot.
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        directory = lib_dir()
        ggml = _ggml(directory)
        if ggml.ggml_backend_reg_count() > 0:  # backends linked in: a build without run-time dispatch
            _loaded = _describe(ggml, "built-in", (), (), [])
            return _loaded
        variant, path, ranked, runnable = _choose_cpu_variant(directory)
        unavailable = _load_gpu_modules(ggml, directory) if gpu else []
        if not ggml.ggml_backend_load(str(path).encode()):
            raise EngineError(f"llama.cpp's CPU backend {path.name} did not load")
        _loaded = _describe(ggml, variant, ranked, runnable, unavailable)
        return _loaded
