"""Modules the tests share (imported as `helpers`: pytest puts tests/ on sys.path, tests/ having no
__init__.py): diffusion_refs, the float64 references of the core's diffusion math; fault_utils, the
micro config and the train.py / sample.py subprocesses of the fault, error and distributed tests."""
