"""The host tier's default size (issue 22 item 1): on CUDA most of the memory available at start (a container's
cgroup limit counts), shared by the tensor-parallel ranks; 4 GiB on CPU or where nothing can be read."""

from tailorkv.memory import host_memory
from tailorkv.memory.host_memory import CPU_HOST_GIB, HOST_SHARE, available_bytes, default_host_gib

GIB = 2**30


def test_available_memory_is_the_lower_of_the_kernels_and_the_cgroups(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {128 * GIB // 1024} kB\nMemAvailable: {100 * GIB // 1024} kB\n")
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    assert available_bytes(str(meminfo), str(cgroup)) == 100 * GIB  # no cgroup files
    (cgroup / "memory.max").write_text("max\n")
    assert available_bytes(str(meminfo), str(cgroup)) == 100 * GIB
    (cgroup / "memory.max").write_text(f"{64 * GIB}\n")
    (cgroup / "memory.current").write_text(f"{4 * GIB}\n")
    assert available_bytes(str(meminfo), str(cgroup)) == 60 * GIB
    assert available_bytes(str(tmp_path / "none"), str(tmp_path / "none")) is None


def test_the_default_host_tier_takes_most_of_the_available_memory_on_cuda_only(monkeypatch):
    assert default_host_gib(cuda=True, available=100 * GIB) == HOST_SHARE * 100
    assert default_host_gib(cuda=True, ranks=4, available=100 * GIB) == HOST_SHARE * 25
    assert default_host_gib(cuda=False, available=100 * GIB) == CPU_HOST_GIB
    monkeypatch.setattr(host_memory, "available_bytes", lambda: None)  # nothing readable
    assert default_host_gib(cuda=True) == CPU_HOST_GIB


def test_serve_on_cuda_defaults_to_the_machines_host_tier_and_the_library_to_4_gib(monkeypatch):
    from tailorkv.cli import build_parser, serve_defaults
    from tailorkv.config import EngineConfig

    monkeypatch.setattr(host_memory, "available_bytes", lambda: 100 * GIB)
    parse = build_parser().parse_args
    assert serve_defaults(parse(["serve", "--device", "cuda", "--tp", "2"])) == {
        "host_kv_gib": HOST_SHARE * 50
    }
    assert serve_defaults(parse(["serve", "--device", "cpu"])) == {"host_kv_gib": CPU_HOST_GIB}
    assert serve_defaults(parse(["serve", "--device", "cuda", "--host-kv-gib", "7"])) == {}
    assert EngineConfig().host_kv_gib == CPU_HOST_GIB
