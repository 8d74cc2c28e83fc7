"""The class planner: ``plan_class(spec, host, template) -> ClassPlan``, a pure function.

Each student's lab is the class's lab under the name ``<class>-<student>``, isolated (every lab
keeps the guide's addresses), planned against the host as it will be with the students' labs
before it: the class fits only if its last lab still fits beside the others and the labs
already on the host, and a class that does not is refused with the numbers, the labs named.
With a template, every lab must be the template's lab under another name
(``lab.stamp.template_differences``) and takes its MACs.

Imports the planner, the model and common.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from labbuilder.common.errors import PlanError
from labbuilder.lab.planner import plan
from labbuilder.lab.stamp import template_differences, with_template_macs
from labbuilder.model.classroom import ClassSpec
from labbuilder.model.lab import HostFacts, Lab, LabUse, Plan


@dataclass(frozen=True)
class ClassPlan:
    spec: ClassSpec
    labs: tuple[tuple[str, Lab, Plan], ...]  # (student, lab, plan), in the class file's order

    def for_student(self, name: str) -> tuple[Lab, Plan]:
        for student, lab, planned in self.labs:
            if student == name:
                return lab, planned
        raise KeyError(name)


def student_lab(spec: ClassSpec, student: str) -> Lab:
    return replace(
        spec.lab,
        name=spec.lab_name(student),
        source=f"{spec.source} (student {student})",
        options=replace(spec.lab.options, isolated=True),
    )


def plan_class(spec: ClassSpec, host: HostFacts, template: Plan | None = None) -> ClassPlan:
    """Plan every student's lab; PlanError if the class does not fit the host or its template.
    Labs of the class already on the host (``host.labs``) count as the students' own."""
    ours = {spec.lab_name(student.name) for student in spec.students}
    others = tuple(use for use in host.labs if use.lab not in ours)
    labs = []
    for student in spec.students:
        lab = student_lab(spec, student.name)
        planned = plan(lab, replace(host, labs=others))
        if template is not None:
            differences = template_differences(planned, template)
            if differences:
                raise PlanError(
                    f"{spec.source}: the class's lab {spec.lab_ref} does not fit template "
                    f"{spec.template}: " + "; ".join(differences),
                    "use the lab the template was saved from, or save a template from this lab",
                )
            planned = with_template_macs(planned, template)
        labs.append((student.name, lab, planned))
        others += (
            LabUse(
                lab=lab.name,
                vcpus=planned.totals.vcpus,
                memory=planned.totals.memory,
                disk_growth=planned.totals.disk,  # a new lab's disks may grow to their sizes
            ),
        )
    return ClassPlan(spec, tuple(labs))
