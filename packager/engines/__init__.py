"""Stage 5 (GPU): TensorRT plans built where they run. builder.py, plans.py, gpu_probe.py and serving.py are the
standard-library-only kit that the serving image runs (deploy/build_engines.py, deploy/start_triton.py, the
Kubernetes pod); check.py (standard library only too) runs in the engine check's TensorRT image
(deploy/check_engines.py). host.py, reference.py, images.py and modes.py are the build env's side."""
