from typing import Any

from django.db import migrations, models


def linear(apps: Any, schema_editor: Any) -> None:
    """Runs recorded before phases ran in parallel ran one phase after the other."""
    PhaseRun = apps.get_model("initpipeline", "PhaseRun")
    previous: dict[int, str] = {}
    for pr in PhaseRun.objects.order_by("run_id", "position").only("run_id", "name"):
        if pr.run_id in previous:
            pr.depends_on = [previous[pr.run_id]]
            pr.save(update_fields=["depends_on"])
        previous[pr.run_id] = pr.name


class Migration(migrations.Migration):
    dependencies = [("initpipeline", "0001_initial")]

    operations = [
        migrations.AddField(
            model_name="phaserun",
            name="depends_on",
            field=models.JSONField(blank=True, default=list, verbose_name="depends on"),
        ),
        migrations.RunPython(linear, migrations.RunPython.noop),
    ]
