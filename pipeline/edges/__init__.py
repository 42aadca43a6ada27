"""The edges that touch the world: file formats, the compact export and ONNX, Ray, MLflow,
figures, and the glue the stage scripts share (command line, errors, process supervision,
profiling through Ray, allocation modes, the result record)."""
