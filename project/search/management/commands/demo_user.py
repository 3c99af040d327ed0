from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the demo's superuser admin/admin unless a user exists (demo only)."

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        if User.objects.exists():
            return
        User.objects.create_superuser("admin", "admin@example.com", "admin")
        self.stdout.write("created the demo superuser: admin / admin")
