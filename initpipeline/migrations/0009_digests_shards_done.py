"""Each sharded phase's row counts its shards done (PhaseRun.shards_done)."""

from typing import Any

from django.db import migrations, models


def count_shards_done(apps: Any, schema_editor: Any) -> None:
    """The shards already done of the sharded phases of runs in flight: the count the
    last shard to succeed completes, to send the merge."""
    PhaseRun = apps.get_model("initpipeline", "PhaseRun")
    merges = PhaseRun.objects.filter(shard_of="", shard_count__isnull=False)
    for merge in merges.filter(run__state__in=["pending", "running"]):
        done = PhaseRun.objects.filter(
            run_id=merge.run_id, shard_of=merge.name, state__in=["succeeded", "cached"]
        ).count()
        PhaseRun.objects.filter(pk=merge.pk).update(shards_done=done)


class Migration(migrations.Migration):
    dependencies = [
        ("initpipeline", "0008_web_processes"),
    ]

    operations = [
        migrations.AddField(
            model_name="phaserun",
            name="shards_done",
            field=models.PositiveIntegerField(default=0, verbose_name="shards done"),
        ),
        migrations.RunPython(count_shards_done, migrations.RunPython.noop),
    ]
