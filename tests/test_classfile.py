"""Class files and the class planner (pure): what a class file may say, the errors that name the
key, and a class planned against a host, refused with the numbers when it does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from labbuilder.common.errors import LabFileError, PlanError
from labbuilder.lab.classfile import load_class_file
from labbuilder.lab.classplan import plan_class
from labbuilder.lab.files import load_builtin_lab
from labbuilder.lab.planner import plan
from labbuilder.model.lab import HostFacts, LabUse

GIB = 1024**3
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl bob@laptop"
SMALLEST = """name = "os101"
lab = "guide-3node"          # a built-in lab or a lab file
template = "os101-image"     # students start from this template ...
[[students]]
name = "alice"
[[students]]
name = "bob"
ssh_key = "{key}"
"""


def write(tmp_path: Path, text: str, name: str = "class.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_smallest_class_file_reads_as_the_issue_writes_it(tmp_path: Path) -> None:
    spec = load_class_file(write(tmp_path, SMALLEST.format(key=KEY)))
    assert spec.name == "os101" and spec.template == "os101-image" and spec.stage is None
    assert [(s.name, s.ssh_key) for s in spec.students] == [("alice", None), ("bob", KEY)]
    assert spec.lab_name("alice") == "os101-alice"
    assert spec.lab.options.isolated  # every student's lab keeps the guide's addresses
    controller = next(n for n in spec.lab.nodes if n.name == "controller")
    assert controller.memory == 5 * GIB  # the recipe's minimum, as `up` would size it
    assert spec.limits.parallel == 2 and spec.limits.access_port == 2222


def test_a_lab_file_beside_the_class_file_is_read(tmp_path: Path) -> None:
    write(tmp_path, 'name = "mylab"\n[nodes.compute]\ncount = 2\n', "lab.toml")
    spec = load_class_file(
        write(
            tmp_path, 'name = "c1"\nlab = "lab.toml"\nstage = "image"\n[[students]]\nname = "a"\n'
        )
    )
    assert spec.stage == "image" and spec.template is None
    assert sorted(n.name for n in spec.lab.nodes) == [
        "compute1",
        "compute2",
        "controller",
        "network",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "c"\n[[students]]\nname = "a"\n', "'lab' is missing"),
        ('name = "c"\nlab = "guide-3node"\n', "'students' is missing"),
        ('name = "c"\nlab = "guide-3node"\nstudents = []\n', "students = [] is empty"),
        ('name = "c"\nlab = "nosuchlab"\n[[students]]\nname = "a"\n', 'lab = "nosuchlab" is not a built-in lab'),
        ('name = "c"\nlab = "/etc/lab.toml"\n[[students]]\nname = "a"\n', "outside the class file's folder"),
        ('name = "c"\nlab = "guide-3node"\n[[students]]\nname = "Al"\n', 'students[0].name = "Al" is not a valid student name'),
        ('name = "c"\nlab = "guide-3node"\n[[students]]\nname = "a-b"\n', "not a valid student name"),
        ('name = "c"\nlab = "guide-3node"\n[[students]]\nname = "a"\n[[students]]\nname = "a"\n', 'students[1].name = "a" is given twice'),
        ('name = "c"\nlab = "guide-3node"\n[[students]]\nname = "a"\nemail = "x"\n', "unknown key 'students[0].email'"),
        ('name = "c"\nlab = "guide-3node"\ntemplate = "t"\nstage = "image"\n[[students]]\nname = "a"\n', "is given with a template"),
        ('name = "c"\nlab = "guide-3node"\ntemplate = "../x"\n[[students]]\nname = "a"\n', 'template = "../x" is not a template name'),
        ('name = "c"\nlab = "guide-3node"\n[[students]]\nname = "a"\n[limits]\nparallel = 0\n', "limits.parallel = 0 is below 1"),
        ('name = "c"\nlab = "guide-3node"\n[[students]]\nname = "a"\n[limits]\naccess_port = 22\n', "limits.access_port = 22 is below 1024"),
        ('name = "averyveryverylongclassname"\nlab = "guide-3node"\n[[students]]\nname = "a"\n', "is not a valid name"),
    ],
)  # fmt: skip
def test_bad_class_files_are_refused_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(LabFileError) as refused:
        load_class_file(write(tmp_path, text))
    assert message in refused.value.message, refused.value.message
    assert refused.value.message.startswith(str(tmp_path / "class.toml"))
    assert refused.value.exit_code == 2 and refused.value.hint


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ('command=\\"sh\\" ' + KEY, "is not an OpenSSH public key line"),
        (KEY + "\\nssh-rsa AAAA", "is not an OpenSSH public key line"),
        ("ssh-ed25519 !!!notbase64", "is not base64 of an SSH key"),
        ("ssh-rsa " + KEY.split()[1], "says ssh-rsa but holds a ssh-ed25519 key"),
        (KEY.rsplit(" ", 1)[0] + " bob$(reboot)", "has a comment with characters"),
    ],
)
def test_a_students_key_is_a_plain_public_key_line(tmp_path: Path, key: str, message: str) -> None:
    with pytest.raises(LabFileError) as refused:
        load_class_file(write(tmp_path, SMALLEST.format(key=key)))
    assert "students[1].ssh_key" in refused.value.message and message in refused.value.message


def _spec(tmp_path: Path, students: int):  # type: ignore[no-untyped-def]
    names = "".join(f'[[students]]\nname = "s{i}"\n' for i in range(students))
    return load_class_file(write(tmp_path, f'name = "cls"\nlab = "guide-3node"\n{names}'))


HOST = HostFacts(cpus=2, memory_total=24 * GIB, memory_available=22 * GIB, disk_free=200 * GIB)


def test_a_class_that_fits_gets_one_isolated_guide_lab_per_student(tmp_path: Path) -> None:
    planned = plan_class(_spec(tmp_path, 2), HOST)
    assert [(student, lab.name) for student, lab, _ in planned.labs] == [
        ("s0", "cls-s0"),
        ("s1", "cls-s1"),
    ]
    for _, _, lab_plan in planned.labs:
        assert lab_plan.node("controller").management_address == "10.0.0.11"
        assert lab_plan.gateway is not None and lab_plan.gateway.namespace.startswith("lbns-cls-s")
        assert lab_plan.network("external").floating_range == ("203.0.113.101", "203.0.113.200")


def test_a_class_that_does_not_fit_is_refused_with_the_numbers_and_the_labs(
    tmp_path: Path,
) -> None:
    busy = HostFacts(**{**HOST.__dict__, "labs": (LabUse("other", 6, 9 * GIB, 0),)})
    with pytest.raises(PlanError) as refused:
        plan_class(_spec(tmp_path, 2), busy)
    message = refused.value.message
    assert "(student s1)" in message and "other 9 GB" in message and "cls-s0 9 GB" in message
    assert "more than the 23 GB its nodes may have together" in message
    # With KSM running the policy allows 1.5 times the memory: the same class fits.
    assert plan_class(_spec(tmp_path, 2), HostFacts(**{**busy.__dict__, "ksm": True}))


def test_a_class_lab_unlike_its_template_is_refused(tmp_path: Path) -> None:
    template = plan(load_builtin_lab("guide-2node-legacy"), HostFacts())
    with pytest.raises(PlanError, match="does not fit template"):
        plan_class(_spec(tmp_path, 1), HOST, template)
