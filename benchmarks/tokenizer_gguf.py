"""Write the embedded GGUF's metadata without its tensors (1.8 MB, not 98): the tokenizer that dummy models use, small
enough to travel with the wheels in one device call.

    python -m benchmarks.tokenizer_gguf .whl/tokenizer.gguf
"""

from __future__ import annotations

import sys

import gguf

from tailorkv.models.embedded import embedded_model_path
from tailorkv.models.gguf_loader import PlainReader


def write_tokenizer_gguf(src: str, dst: str) -> None:
    reader = PlainReader(src)
    writer = gguf.GGUFWriter(dst, arch=reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        sub = {"sub_type": field.types[-1]} if kind == gguf.GGUFValueType.ARRAY else {}
        writer.add_key_value(name, field.contents(), kind, **sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    write_tokenizer_gguf(embedded_model_path(), sys.argv[1])
