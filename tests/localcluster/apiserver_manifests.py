"""Manifests the embedded API server tests apply: a small CRD exercising the schema features."""

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: trainings.example.kubetune.dev
spec:
  group: example.kubetune.dev
  scope: Namespaced
  names: {kind: Training, plural: trainings, singular: training, shortNames: [trn], categories: [all]}
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {status: {}}
      additionalPrinterColumns:
        - {name: Phase, type: string, jsonPath: .status.phase, description: Lifecycle phase.}
        - {name: Replicas, type: integer, jsonPath: .spec.workers.replicas}
        - {name: Model, type: string, jsonPath: .spec.model, priority: 1}
        - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
      schema:
        openAPIV3Schema:
          type: object
          description: Training fine-tunes a model.
          required: [spec]
          properties:
            apiVersion: {type: string}
            kind: {type: string}
            metadata: {type: object}
            spec:
              type: object
              description: Spec says what to train and how.
              required: [model]
              properties:
                model:
                  type: string
                  description: Base model folder, an s3:// URI.
                  pattern: '^s3://.+'
                precision:
                  type: string
                  description: Numeric precision of the weights.
                  enum: [auto, fp32, bf16]
                  default: auto
                workers:
                  type: object
                  description: How many workers train.
                  default: {}
                  properties:
                    replicas: {type: integer, minimum: 1, maximum: 64, default: 1, description: Worker pod count.}
            status:
              type: object
              x-kubernetes-preserve-unknown-fields: true
"""


def training(name: str, **spec: object) -> str:
    import json

    body = {"apiVersion": "example.kubetune.dev/v1", "kind": "Training", "metadata": {"name": name},
            "spec": {"model": "s3://models/tiny/", **spec}}
    return json.dumps(body)
