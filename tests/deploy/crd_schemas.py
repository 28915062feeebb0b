"""JSON Schemas for the two custom resources the manifests use, which kubernetes-validate does
not know: KEDA's ScaledObject (keda.sh/v1alpha1) and the Prometheus Operator's ServiceMonitor
(monitoring.coreos.com/v1).

Written here from the fields those CRDs document (not copied from them), strict: a field this
schema does not list is an error, so a typo or a field of another version fails the test. They
cover what a flux-server manifest may reasonably set, not every field of the CRDs. What the
CRDs leave as free strings is checked further by the tests: the postgresql trigger's metadata
keys (KEDA reads them from a map) and the HPA behaviour (validated as a real
HorizontalPodAutoscaler's by kubernetes-validate).
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# Prometheus durations: 30s, 1m30s, 500ms...
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}


def _object(properties: Schema, required: tuple[str, ...] = ()) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_METADATA = _object(
    {"name": _NAME, "namespace": _NAME, "labels": _STRING_MAP, "annotations": _STRING_MAP},
    required=("name",),
)
_SECRET_KEY = _object({"name": _NAME, "key": {"type": "string"}, "optional": {"type": "boolean"}}, ("key",))

SCALED_OBJECT: Schema = _object(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": _object(
            {
                "scaleTargetRef": _object(
                    {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": _NAME,
                        "envSourceContainerName": {"type": "string"},
                    },
                    required=("name",),
                ),
                "pollingInterval": _INT32,
                "cooldownPeriod": _INT32,
                "initialCooldownPeriod": _INT32,
                "idleReplicaCount": _INT32,
                "minReplicaCount": _INT32,
                "maxReplicaCount": _INT32,
                "fallback": _object(
                    {"failureThreshold": _INT32, "replicas": _INT32, "behavior": {"type": "string"}},
                    required=("failureThreshold", "replicas"),
                ),
                "advanced": _object(
                    {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": _object(
                            # `behavior` is an autoscaling/v2 HorizontalPodAutoscalerBehavior:
                            # the tests validate it with Kubernetes' own schema.
                            {"name": {"type": "string"}, "behavior": {"type": "object"}}
                        ),
                    }
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _object(
                        {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metadata": _STRING_MAP,
                            "authenticationRef": _object(
                                {
                                    "name": _NAME,
                                    "kind": {
                                        "enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]
                                    },
                                },
                                required=("name",),
                            ),
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                        },
                        required=("type", "metadata"),
                    ),
                },
            },
            required=("scaleTargetRef", "triggers"),
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)

# KEDA's postgresql scaler reads these metadata keys (the rest of the map is ignored, so a
# misspelt key would be dropped silently: the tests refuse any other).
POSTGRESQL_TRIGGER_KEYS = frozenset(
    {
        "query",
        "targetQueryValue",
        "activationTargetQueryValue",
        "connectionFromEnv",
        "host",
        "port",
        "userName",
        "dbName",
        "sslmode",
        "passwordFromEnv",
    }
)

_ENDPOINT = _object(
    {
        "port": {"type": "string"},
        "targetPort": {"type": ["string", "integer"]},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
        "authorization": _object({"type": {"type": "string"}, "credentials": _SECRET_KEY}),
        "bearerTokenSecret": _SECRET_KEY,
        "tlsConfig": {"type": "object"},
        "relabelings": {"type": "array", "items": {"type": "object"}},
        "metricRelabelings": {"type": "array", "items": {"type": "object"}},
    }
)

SERVICE_MONITOR: Schema = _object(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": _object(
            {
                "jobLabel": {"type": "string"},
                "selector": _object(
                    {
                        "matchLabels": _STRING_MAP,
                        "matchExpressions": {"type": "array", "items": {"type": "object"}},
                    }
                ),
                "namespaceSelector": _object(
                    {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}
                ),
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
            required=("selector", "endpoints"),
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)

CUSTOM_SCHEMAS: dict[tuple[str, str], Schema] = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
}
