"""NUMA placement of a tensor-parallel rank: its process runs on the CPUs of the NUMA node its GPU is attached to, so
that the host tier it allocates and page-locks (first touch) lives in that node's memory, next to the GPU's PCIe
link. Read from sysfs; where the kernel reports no node (-1, a one-node machine, no sysfs) nothing changes."""

from __future__ import annotations

import os

import torch

SYSFS = "/sys"


def parse_cpulist(text: str) -> set[int]:
    """A kernel CPU list ("0-15,32-47") as a set of CPU ids."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def gpu_node(pci_bus_id: str, sysfs: str = SYSFS) -> int | None:
    """The NUMA node of the PCI device `pci_bus_id` ("0000:1b:00.0"), or None when unknown."""
    try:
        with open(f"{sysfs}/bus/pci/devices/{pci_bus_id.lower()}/numa_node") as f:
            node = int(f.read())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def node_cpus(node: int, sysfs: str = SYSFS) -> set[int]:
    try:
        with open(f"{sysfs}/devices/system/node/node{node}/cpulist") as f:
            return parse_cpulist(f.read())
    except OSError:
        return set()


def bind_to_gpu_node(device: torch.device, sysfs: str = SYSFS) -> int | None:
    """Run this process on the allowed CPUs of `device`'s NUMA node; returns the node, or None (nothing changed)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    bus = getattr(props, "pci_bus_id", None)
    if bus is None:
        return None
    domain = getattr(props, "pci_domain_id", 0)
    node = gpu_node(f"{domain:04x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0", sysfs)
    cpus = node_cpus(node, sysfs) & os.sched_getaffinity(0) if node is not None else set()
    if not cpus:
        return None
    os.sched_setaffinity(0, cpus)
    return node
