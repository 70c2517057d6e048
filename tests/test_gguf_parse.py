"""PlainReader, the GGUF header parse every model load runs, against the gguf package's own: the same fields (parts,
data indices, types) and tensors, for arrays of strings, scalars, bools and arrays, and plain values."""

import gguf
import numpy as np

from tailorkv.models.gguf_loader import PlainReader


def fields_and_tensors(reader) -> tuple[list, list]:
    fields = [
        (f.offset, f.name, f.data, f.types, [(p.dtype, p.tobytes()) for p in f.parts])
        for f in reader.fields.values()
    ]
    tensors = [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in reader.tensors]
    return fields, tensors


def test_the_header_parses_as_gguf_parses_it(tmp_path):
    path = str(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_block_count(3)
    w.add_name("tiny ünïcode")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "", "héllo", "a" * 300])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.25, 3.0])
    w.add_array("tokenizer.ggml.token_type", [1, 2, 3, 6])
    w.add_array("x.flags", [True, False])
    w.add_array("x.nested", [[1, 2], [3]])
    w.add_float32("x.eps", 1e-5)
    w.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, theirs = PlainReader(path), gguf.GGUFReader(path)
    assert fields_and_tensors(ours) == fields_and_tensors(theirs)
    assert ours.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "", "héllo", "a" * 300]
