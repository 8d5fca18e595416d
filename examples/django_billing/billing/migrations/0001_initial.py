"""The invoice table."""

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Invoice",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("order_id", models.BigIntegerField(unique=True)),
                ("customer", models.CharField(max_length=100)),
                ("amount_cents", models.PositiveIntegerField()),
                (
                    "message_id",
                    models.UUIDField(help_text="The orders.created message it was made from."),
                ),
                ("created_at", models.DateTimeField(auto_now_add=True)),
            ],
        ),
    ]
