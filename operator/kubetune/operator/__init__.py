"""The kubetune operator: FineTuneJob CRD -> trainer config, worker pods and job status.

Pure parts (no kopf, no API client): ``spec``, ``settings``, ``trainer_config``, ``manifests``,
``status``. Kopf wiring: ``handlers``; entry point: ``main``.
"""
