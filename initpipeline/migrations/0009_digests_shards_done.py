"""Artifacts keep their digest with its algorithm (``Artifact.sha256`` becomes ``digest``,
``sha256:<hex>`` for every artifact so far); each sharded phase's row counts its shards
done (``PhaseRun.shards_done``).

The column is renamed, not copied: a process of an earlier release, which would take a
``blake3:`` digest for a sha256 and mark a sound artifact corrupt for every host, fails
to read the table instead (README: Upgrading).
"""

from typing import Any

from django.db import migrations, models
from django.db.models import F, Value
from django.db.models.functions import Concat, Substr

SHA256 = "sha256:"

#: In the failed_check that earlier releases wrote for a pickle whose signature the
#: checking host's keys did not verify: a verdict on that host, not on the artifact.
SIGNATURE_VERDICT = "has no valid signature"


def prefix_digests(apps: Any, schema_editor: Any) -> None:
    Artifact = apps.get_model("initpipeline", "Artifact")
    PhaseRun = apps.get_model("initpipeline", "PhaseRun")
    Artifact.objects.exclude(digest__contains=":").update(digest=Concat(Value(SHA256), F("digest")))
    Artifact.objects.filter(failed_check__contains=SIGNATURE_VERDICT).update(failed_check="")
    for row in PhaseRun.objects.filter(checkpoint__isnull=False).only("checkpoint").iterator():
        point = row.checkpoint
        if isinstance(point, dict) and "sha256" in point:
            point["digest"] = SHA256 + point.pop("sha256")
            PhaseRun.objects.filter(pk=row.pk).update(checkpoint=point)


def unprefix_digests(apps: Any, schema_editor: Any) -> None:
    Artifact = apps.get_model("initpipeline", "Artifact")
    PhaseRun = apps.get_model("initpipeline", "PhaseRun")
    newer = Artifact.objects.exclude(digest__startswith=SHA256).count()
    if newer:
        raise RuntimeError(
            f"{newer} artifact records have a digest other than sha256 (published with "
            "BLAKE3): releases before migration 0009 cannot verify them. Delete those "
            "records (and the generations that hold them) before migrating back."
        )
    Artifact.objects.update(digest=Substr(F("digest"), len(SHA256) + 1))
    for row in PhaseRun.objects.filter(checkpoint__isnull=False).only("checkpoint").iterator():
        point = row.checkpoint
        if isinstance(point, dict) and "digest" in point:
            digest = point.pop("digest")
            # A BLAKE3 checkpoint cannot be checked there: the phase starts over.
            if digest.startswith(SHA256):
                point["sha256"] = digest[len(SHA256) :]
            PhaseRun.objects.filter(pk=row.pk).update(
                checkpoint=point if "sha256" in point else None
            )


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
        migrations.RenameField(model_name="artifact", old_name="sha256", new_name="digest"),
        migrations.AlterField(
            model_name="artifact",
            name="digest",
            field=models.CharField(
                help_text="The file's content digest with its algorithm: blake3:<hex>, or sha256:<hex> for artifacts published before BLAKE3.",
                max_length=200,
                verbose_name="digest",
            ),
        ),
        migrations.RunPython(prefix_digests, unprefix_digests),
        migrations.AddField(
            model_name="phaserun",
            name="shards_done",
            field=models.PositiveIntegerField(default=0, verbose_name="shards done"),
        ),
        migrations.RunPython(count_shards_done, migrations.RunPython.noop),
    ]
