"""Export of trained students to PyTorch and ONNX (needs the `export` extra).

`torch_nets` holds PyTorch twins of the face networks whose state-dict keys
equal the reference code's; `tools/export_student.py` is the command line.
Nothing here is imported by the training package, so it runs without torch.
"""
