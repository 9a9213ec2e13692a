"""Modules the tests share (imported as `helpers`: pytest puts tests/ on sys.path, tests/ having no
__init__.py): diffusion_refs, the float64 references of the core's diffusion math; fault_utils, the
micro config and the train.py / sample.py subprocesses of the fault, error and distributed tests;
torch_fidelity_ref and torch_fidelity_metrics, torch-fidelity's Inception and metric modules imported
without torchvision, and random Inception weights in the real .pth format; tensorboard_reader, the
event files read back with TensorBoard's own reader; histogram_flow, a flow with a closed-form NLL (the pixel histogram's exact Bayes eps)."""
