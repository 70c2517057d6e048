"""PlainReader, the GGUF header parse every model load runs, against the gguf package's own: the same fields (parts,
data indices, types) and tensors, for arrays of strings, scalars, bools and arrays, and plain values; and the
tokenizer-only GGUF the GPU stages carry."""

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


def test_the_tokenizer_gguf_tokenizes_as_the_embedded_model(tmp_path):
    """benchmarks/tokenizer_gguf.py: the embedded GGUF's metadata without its tensors, all a dummy model reads."""
    from benchmarks.tokenizer_gguf import write_tokenizer_gguf
    from tailorkv.engine.tokenizer import Tokenizer
    from tailorkv.models.embedded import embedded_model_path
    from tailorkv.models.gguf_loader import load_gguf

    whole = embedded_model_path()
    write_tokenizer_gguf(whole, str(tmp_path / "tok.gguf"))
    small = load_gguf(str(tmp_path / "tok.gguf"))
    assert small.num_tensors == 0 and (tmp_path / "tok.gguf").stat().st_size < 2_000_000
    text = "The capital of France is Paris. <|im_start|>user\nnaïve café 1234"
    assert Tokenizer(small.tokenizer).encode(text) == Tokenizer(load_gguf(whole).tokenizer).encode(
        text
    )
