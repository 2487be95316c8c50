"""deploy/kubernetes: every manifest checked against the real schemas (Kubernetes' own, prometheus-operator's CRDs), against each other, and against the daemon's CLI."""

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from monitor import __version__
from monitor.cli import cli
from monitor.settings import ListenAddress

ROOT = Path(__file__).resolve().parents[2]
KDIR = ROOT / "deploy/kubernetes"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
GENERATOR = KDIR / "gen-prometheusrule.py"
CRDS = ROOT / "tests/data/crds"
# The oldest Kubernetes the manifests are meant for, and a recent one; kubernetes_validate ships
# the schemas of both (its "strict" set: unknown fields are errors, as kubectl's default
# server-side field validation makes them).
K8S_VERSIONS = ("1.30", "1.34")
PORT = 9966
CORE_KINDS = ("Namespace", "DaemonSet", "Service")
CRD_FILES = {"ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
             "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}


def load(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> dict:
    """kind -> the one object of that kind, from the files kustomization.yaml lists."""
    out = {}
    for name in load(KDIR / "kustomization.yaml")[0]["resources"]:
        for doc in load(KDIR / name):
            assert doc["kind"] not in out, f"two {doc['kind']} objects"
            out[doc["kind"]] = doc
    return out


@pytest.fixture(scope="module")
def objs():
    return manifests()


def container(objs) -> dict:
    (c,) = objs["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return c


# --- the files ------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest_and_each_holds_one_object():
    listed = load(KDIR / "kustomization.yaml")[0]["resources"]
    on_disk = sorted(p.name for p in KDIR.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk == sorted(["namespace.yaml", "daemonset.yaml", "service.yaml",
                                                 "servicemonitor.yaml", "prometheusrule.yaml"])
    for name in listed:
        assert len(load(KDIR / name)) == 1, name
    assert sorted(manifests()) == sorted(CORE_KINDS + tuple(CRD_FILES))


def test_every_file_opens_with_a_one_line_purpose_comment():
    for path in sorted(KDIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert re.match(rf"# {re.escape(path.name)}: \S.*", first) or (
            path.name == "prometheusrule.yaml" and first.startswith("# prometheusrule.yaml: generated from")), path.name


def test_kustomize_builds_the_same_objects():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl missing: make setup installs it (Debian's kubernetes-client)")
    res = subprocess.run([kubectl, "kustomize", str(KDIR)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    built = {d["kind"]: d for d in yaml.safe_load_all(res.stdout) if d}
    assert built == manifests()


# --- Kubernetes' own schemas ----------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", CORE_KINDS)
def test_core_objects_match_the_kubernetes_schema(objs, kind, version):
    assert kubernetes_validate.validate(objs[kind], version, strict=True) == version


def _set(doc, path, value):
    *parents, last = path
    for key in parents:
        doc = doc[key]
    doc[last] = value


def _rename(doc, path, new):
    *parents, last = path
    for key in parents:
        doc = doc[key]
    doc[new] = doc.pop(last)


POD = ("spec", "template", "spec")
CTR = POD + ("containers", 0)
BROKEN_CORE = [
    ("DaemonSet", "typo in a container field", "'readynessProbe'",
     lambda d: _rename(d, CTR + ("readinessProbe",), "readynessProbe")),
    ("DaemonSet", "typo in the security context", "'adds'",
     lambda d: _rename(d, CTR + ("securityContext", "capabilities", "add"), "adds")),
    ("DaemonSet", "typo in a volume", "'hostpath'",
     lambda d: _rename(d, POD + ("volumes", 0, "hostPath"), "hostpath")),
    ("DaemonSet", "port as a string", "'9966' is not of type 'integer'",
     lambda d: _set(d, CTR + ("ports", 0, "containerPort"), "9966")),
    ("DaemonSet", "readOnly as a string", "'true' is not of type",
     lambda d: _set(d, CTR + ("volumeMounts", 0, "readOnly"), "true")),
    ("Service", "typo in the spec", "'clusterIp'",
     lambda d: _rename(d, ("spec", "clusterIP"), "clusterIp")),
    ("Service", "port as a string", "'9966' is not of type 'integer'",
     lambda d: _set(d, ("spec", "ports", 0, "port"), "9966")),
    ("Namespace", "typo in the metadata", "'lables'",
     lambda d: _rename(d, ("metadata", "labels"), "lables")),
]


@pytest.mark.parametrize("kind,what,error,breaks", BROKEN_CORE, ids=[f"{k}: {w}" for k, w, _, _ in BROKEN_CORE])
def test_the_kubernetes_schema_rejects_a_broken_copy(objs, kind, what, error, breaks):
    broken = copy.deepcopy(objs[kind])
    breaks(broken)
    for version in K8S_VERSIONS:
        with pytest.raises(jsonschema.ValidationError) as caught:
            kubernetes_validate.validate(broken, version, strict=True)
        assert error in caught.value.message


# --- prometheus-operator's CRDs -------------------------------------------------------------

def _k8s_definitions() -> Resource:
    """Kubernetes' own definitions (for ObjectMeta), from kubernetes_validate's strict set."""
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    return Resource.from_contents(json.loads((base / f"v{K8S_VERSIONS[0]}.0-local-strict/_definitions.json").read_text()))


OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def strict(schema, top=True):
    """The CRD's schema as the API server applies it under strict field validation: an unknown
    field is an error (a structural schema alone would silently prune it). Objects that declare
    their properties get additionalProperties: false, unless they preserve unknown fields;
    metadata is checked as the ObjectMeta it is."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict(v, False) for k, v in out["properties"].items()}
        if top:
            out["properties"]["metadata"] = {"$ref": OBJECT_META}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"], False)
    if "items" in out:
        out["items"] = strict(out["items"], False)
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(s, False) for s in out[key]]
    return out


def crd_validator(kind, strict_fields=True):
    (crd,) = load(CRDS / CRD_FILES[kind])
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    registry = _k8s_definitions() @ Registry()
    return jsonschema.Draft202012Validator(strict(schema) if strict_fields else schema, registry=registry), crd


def test_vendored_crds_name_their_source():
    for name in CRD_FILES.values():
        first = (CRDS / name).read_text().splitlines()[0]
        assert re.fullmatch(r"# Vendored unmodified below this line from github.com/prometheus-operator/"
                            rf"prometheus-operator, path example/prometheus-operator-crd/{re.escape(name)}, "
                            r"commit [0-9a-f]{40} \(operator 0\.\d+\.\d+\); .*", first), name


@pytest.mark.parametrize("kind", tuple(CRD_FILES))
def test_crd_objects_match_the_operator_schema(objs, kind):
    validator, crd = crd_validator(kind)
    doc = objs[kind]
    assert doc["apiVersion"] == f"{crd['spec']['group']}/v1"
    assert crd["spec"]["scope"] == "Namespaced" and doc["metadata"]["namespace"] == "tcpstate"
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    assert errors == []


EP = ("spec", "endpoints", 0)
GROUP = ("spec", "groups", 0)
BROKEN_CRD = [
    ("ServiceMonitor", "typo in an endpoint field", "'intervall'",
     lambda d: _rename(d, EP + ("interval",), "intervall")),
    ("ServiceMonitor", "interval as a number", "15 is not of type 'string'",
     lambda d: _set(d, EP + ("interval",), 15)),
    ("ServiceMonitor", "interval not a duration", "'15 seconds' does not match",
     lambda d: _set(d, EP + ("interval",), "15 seconds")),
    ("ServiceMonitor", "unknown relabel action", "'rename' is not one of",
     lambda d: _set(d, EP + ("relabelings", 0, "action"), "rename")),
    ("ServiceMonitor", "typo in a relabeling", "'targetLabels'",
     lambda d: _rename(d, EP + ("relabelings", 0, "targetLabel"), "targetLabels")),
    ("ServiceMonitor", "no selector", "'selector' is a required property",
     lambda d: d["spec"].pop("selector")),
    ("ServiceMonitor", "typo in the metadata", "'lables'",
     lambda d: _rename(d, ("metadata", "labels"), "lables")),
    ("PrometheusRule", "for as a number", "30 is not of type 'string'",
     lambda d: _set(d, GROUP + ("rules", 0, "for"), 30)),
    ("PrometheusRule", "typo in a rule", "'expression' was unexpected",
     lambda d: _rename(d, GROUP + ("rules", 0, "expr"), "expression")),
    ("PrometheusRule", "group without a name", "'name' is a required property",
     lambda d: d["spec"]["groups"][0].pop("name")),
    ("PrometheusRule", "label value not a string", "2 is not of type 'string'",
     lambda d: _set(d, GROUP + ("rules", 0, "labels", "severity"), 2)),
]


@pytest.mark.parametrize("kind,what,error,breaks", BROKEN_CRD, ids=[f"{k}: {w}" for k, w, _, _ in BROKEN_CRD])
def test_the_operator_schema_rejects_a_broken_copy(objs, kind, what, error, breaks):
    broken = copy.deepcopy(objs[kind])
    breaks(broken)
    validator, _ = crd_validator(kind)
    messages = [e.message for e in validator.iter_errors(broken)]
    assert any(error in m for m in messages), messages


def test_the_crd_schema_alone_would_only_prune_a_typo():
    # Why strict() exists: as vendored, the schema accepts an unknown field (the API server
    # would drop it silently), so only the strict reading catches the typo.
    broken = copy.deepcopy(manifests()["ServiceMonitor"])
    _rename(broken, EP + ("interval",), "intervall")
    loose, _ = crd_validator("ServiceMonitor", strict_fields=False)
    tight, _ = crd_validator("ServiceMonitor")
    assert list(loose.iter_errors(broken)) == []
    assert [e.validator for e in tight.iter_errors(broken)] == ["additionalProperties"]


# --- the objects agree with each other ------------------------------------------------------

def test_every_object_is_in_the_namespace(objs):
    assert objs["Namespace"]["metadata"]["name"] == "tcpstate"
    for kind in ("DaemonSet", "Service") + tuple(CRD_FILES):
        assert objs[kind]["metadata"]["namespace"] == "tcpstate", kind
    # hostNetwork, hostPath and CAP_BPF/CAP_PERFMON are all beyond Pod Security "baseline".
    assert objs["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_selectors_match_the_pods(objs):
    ds, svc = objs["DaemonSet"], objs["Service"]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert svc["spec"]["selector"] == selector
    assert "version" not in " ".join(selector)  # a version in the selector would orphan pods on upgrade


def test_servicemonitor_selects_the_service_and_names_its_port(objs):
    svc, sm = objs["Service"], objs["ServiceMonitor"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    (ep,) = sm["spec"]["endpoints"]
    assert [p["name"] for p in svc["spec"]["ports"]] == [ep["port"]] == ["metrics"]
    assert (ep["path"], ep["interval"]) == ("/metrics", "15s")
    assert ep["relabelings"] == [{"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node",
                                  "action": "replace"}]
    assert svc["spec"]["clusterIP"] == "None"


def test_job_label_is_the_one_the_alerts_expect(objs):
    # With no jobLabel, prometheus-operator names the job after the Service.
    assert "jobLabel" not in objs["ServiceMonitor"]["spec"]
    jobs = set(re.findall(r'job="([^"]*)"', ALERTS.read_text()))
    assert jobs == {objs["Service"]["metadata"]["name"]} == {"tcpstate"}


def test_one_port_everywhere(objs):
    c, svc = container(objs), objs["Service"]
    (port,) = c["ports"]
    assert (port["name"], port["containerPort"]) == ("metrics", PORT)
    (sport,) = svc["spec"]["ports"]
    assert sport["port"] == PORT and sport["targetPort"] in (port["name"], PORT)
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {k: (p["path"], p["port"]) for k, p in probes.items()} == {
        "startupProbe": ("/-/ready", PORT), "readinessProbe": ("/-/ready", PORT), "livenessProbe": ("/-/healthy", PORT)}
    # The startup probe has to outlast the BPF compile on a busy node (10-30 s).
    s = c["startupProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= 60


def test_args_parse_with_the_real_cli(objs):
    c = container(objs)
    args = list(c["args"])
    assert args[0] == "run"
    run = cli.commands["run"]
    rest = args[1:]
    has_user = any("--user" in p.opts for p in run.params)
    if not has_user:  # the flag is being added; until it lands, the other arguments must still parse
        i = rest.index("--user")
        del rest[i:i + 2]
    parent = cli.make_context("tcpstate", ["run"])
    ctx = run.make_context("run", rest, parent=parent)
    assert ctx.params["listen_address"] == ListenAddress(host="", port=PORT)
    if has_user:
        assert ctx.params["user"] == "65534"
    log_level = next(p for p in cli.params if p.name == "log_level")
    env = {e["name"]: e["value"] for e in c["env"]}
    assert log_level.envvar == "TCPSTATE_LOG_LEVEL" and env["TCPSTATE_LOG_LEVEL"] in log_level.type.choices


def test_image_tag_is_the_package_version(objs):
    assert container(objs)["image"] == f"ghcr.io/tcpstate/tcpstate:{__version__}"


def test_least_privilege(objs):
    pod = objs["DaemonSet"]["spec"]["template"]["spec"]
    sc = container(objs)["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsUser"] == 0
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "SETUID", "SETGID", "SETPCAP"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod["automountServiceAccountToken"] is False
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["terminationGracePeriodSeconds"] == 10


def test_host_paths_are_read_only(objs):
    pod = objs["DaemonSet"]["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert host == {"tracefs": "/sys/kernel/tracing", "modules": "/lib/modules", "usr-src": "/usr/src"}
    mounts = container(objs)["volumeMounts"]
    assert {m["name"]: (m["mountPath"], m["readOnly"]) for m in mounts} == {n: (p, True) for n, p in host.items()}


def test_resources(objs):
    r = container(objs)["resources"]
    assert r == {"requests": {"cpu": "50m", "memory": "192Mi"}, "limits": {"memory": "320Mi"}}


def test_rolling_update_one_node_at_a_time(objs):
    ru = objs["DaemonSet"]["spec"]["updateStrategy"]
    assert ru == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%", "maxSurge": 0}}


# --- the PrometheusRule is alerts.yml ------------------------------------------------------

def generate(tmp_path, alerts=ALERTS) -> bytes:
    out = tmp_path / "prometheusrule.yaml"
    res = subprocess.run([sys.executable, str(GENERATOR), "--alerts", str(alerts), "--output", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return out.read_bytes()


def test_prometheusrule_groups_are_the_alert_file_groups(objs):
    assert objs["PrometheusRule"]["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_prometheusrule_is_what_the_generator_writes(tmp_path):
    committed = (KDIR / "prometheusrule.yaml").read_bytes()
    assert committed.startswith(b"# prometheusrule.yaml: generated from deploy/prometheus/alerts.yml by "
                                b"deploy/kubernetes/gen-prometheusrule.py; do not edit.\n")
    assert generate(tmp_path) == committed


def test_a_changed_alert_file_shows_up(tmp_path):
    # The two checks above can fail: one changed threshold changes both the bytes and the groups.
    text = ALERTS.read_text()
    assert text.count("rate(tcpstate_resets_total[1m])) > 100") == 1
    changed = tmp_path / "alerts.yml"
    changed.write_text(text.replace("rate(tcpstate_resets_total[1m])) > 100", "rate(tcpstate_resets_total[1m])) > 50"))
    out = generate(tmp_path, changed)
    assert out != (KDIR / "prometheusrule.yaml").read_bytes()
    assert yaml.safe_load(out)["spec"]["groups"] != manifests()["PrometheusRule"]["spec"]["groups"]


def test_generator_fails_in_one_line(tmp_path):
    bad = tmp_path / "alerts.yml"
    bad.write_text("rules: []\n")
    res = subprocess.run([sys.executable, str(GENERATOR), "--alerts", str(bad), "--output", str(tmp_path / "x.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr == f"gen-prometheusrule: {bad}: no top-level 'groups' list\n"
    assert not (tmp_path / "x.yaml").exists()
