"""A downloaded ONNX face model, read and made runnable in memory (never in its file): inputs the graph declares
but no node reads are dropped, initializers also listed as inputs become constants, a fixed batch of 1 is made
dynamic; its one image input is checked against the user's input spec. Each problem is one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

from facetrain.deploy.input_spec import CHANNELS, InputSpec
from facetrain.deploy.onnx_embedder import _dims_match, first_line
from facetrain.errors import INSTALL, UserError

TEACHER_TODO = "give a face-embedding model: an .onnx file (with --input-spec), a facetrain bundle or its export"


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise UserError(f"a teacher or third-party model needs the onnx package: {INSTALL['serve']}") from None
    return onnx


def read_onnx(path: Path):
    """The ModelProto of `path`; a missing file or one that is not ONNX is one line."""
    onnx = _import_onnx()
    if not path.is_file():
        raise UserError(f"{path}: not found; {TEACHER_TODO}")
    try:
        return onnx.load(str(path))
    except Exception as err:  # protobuf's DecodeError, onnx's own errors, OSError
        raise UserError(f"{path}: not an ONNX model ({type(err).__name__}: {first_line(err)}); "
                        f"{TEACHER_TODO}") from None


def drop_unused_inputs(proto) -> list[str]:
    """Remove, in memory, graph inputs no node reads (onnxruntime demands a value for each) and initializers
    also declared as inputs (a constant the user could override: onnxruntime then cannot fold it). Returns
    the notes saying what was dropped."""
    graph = proto.graph
    constants = {t.name for t in graph.initializer}
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [i.name for i in graph.input if i.name not in read]
    keep = [i for i in graph.input if i.name in read and i.name not in constants]
    notes = [f"dropped {len(unused)} declared but unused inputs ({', '.join(unused[:3])}"
             f"{', ...' if len(unused) > 3 else ''})"] if unused else []
    folded = len(graph.input) - len(unused) - len(keep)
    notes += [f"{folded} initializers listed as inputs made constants"] if folded else []
    del graph.input[:]
    graph.input.extend(keep)
    return notes


def _dims(value_info) -> list:
    """A value's shape: ints for fixed dims, the name (or None) for symbolic ones."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def check_input(proto, spec: InputSpec, path: Path) -> str:
    """The one real input fits `spec`: float, N x 3 x size x size (fixed sides must equal the spec's)."""
    onnx = _import_onnx()
    inputs = list(proto.graph.input)
    if len(inputs) != 1:
        names = ", ".join(f"{i.name} {_dims(i)}" for i in inputs) or "none"
        raise UserError(f"{path}: a teacher takes one image input, this graph needs {len(inputs)} ({names}); "
                        "export the model with the image as its only input")
    inp = inputs[0]
    dims, elem = _dims(inp), inp.type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise UserError(f"{path}: input {inp.name} is {onnx.TensorProto.DataType.Name(elem).lower()}, not float32 "
                        "(N x 3 x H x W); a facetrain.export file is read without --input-spec")
    want = [None, CHANNELS, spec.size, spec.size]
    if not _dims_match(dims, want):
        raise UserError(f"{path}: input {inp.name} is {dims}, but the input spec ({spec.describe()}) says "
                        f"N x {CHANNELS} x {spec.size} x {spec.size}: correct the spec's size from the model's "
                        "documentation (NCHW RGB/BGR models only)")
    return inp.name


def free_batch(proto) -> bool:
    """A fixed batch of 1 on the input and outputs -> a named dim (in memory); True if there was one."""
    values = [proto.graph.input[0], *proto.graph.output]
    fixed = [v for v in values if _dims(v) and _dims(v)[0] == 1]
    for v in fixed:
        dim = v.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "N"
    return bool(fixed)
