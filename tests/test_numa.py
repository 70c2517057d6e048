"""NUMA placement of a tensor-parallel rank (memory/numa.py), against a sysfs tree made for the test."""

import os
from types import SimpleNamespace

import torch

from tailorkv.memory import numa


def test_cpulist_parses_ranges_and_singles():
    assert numa.parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert numa.parse_cpulist("") == set()


def test_a_rank_runs_on_the_cpus_of_its_gpus_node(tmp_path, monkeypatch):
    gpu = tmp_path / "bus/pci/devices/0000:1b:00.0"
    gpu.mkdir(parents=True)
    (gpu / "numa_node").write_text("1\n")
    node = tmp_path / "devices/system/node/node1"
    node.mkdir(parents=True)
    (node / "cpulist").write_text("2-3,6,40-41\n")
    props = SimpleNamespace(pci_bus_id=0x1B, pci_device_id=0, pci_domain_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    bound = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: bound.append(set(cpus)))
    cuda = torch.device("cuda", 0)
    assert numa.bind_to_gpu_node(cuda, str(tmp_path)) == 1
    assert bound == [{2, 3, 6}]  # the node's CPUs this process may use
    (gpu / "numa_node").write_text("-1\n")  # no node reported: nothing changes
    assert numa.bind_to_gpu_node(cuda, str(tmp_path)) is None
    assert numa.bind_to_gpu_node(torch.device("cpu"), str(tmp_path)) is None
    assert bound == [{2, 3, 6}]
