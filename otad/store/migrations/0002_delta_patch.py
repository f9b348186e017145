"""Delta patches (issue 14): the delta_patch table (written by ``tortoise makemigrations``; do not edit:
a change is a new migration)."""

from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise.fields.base import OnDelete
from tortoise import fields
from tortoise.indexes import Index

class Migration(migrations.Migration):
    dependencies = [('models', '0001_initial')]

    initial = False

    operations = [
        ops.CreateModel(
            name='DeltaPatch',
            fields=[
                ('id', fields.IntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('package', fields.ForeignKeyField('models.Package', source_field='package_id', db_constraint=True, to_field='id', related_name='deltas', on_delete=OnDelete.CASCADE)),
                ('base', fields.ForeignKeyField('models.Package', source_field='base_id', db_constraint=True, to_field='id', related_name='deltas_from', on_delete=OnDelete.CASCADE)),
                ('base_version', fields.CharField(max_length=128)),
                ('base_elf_sha256', fields.CharField(null=True, max_length=64)),
                ('file_name', fields.CharField(unique=True, max_length=64)),
                ('size', fields.BigIntField()),
                ('md5', fields.CharField(max_length=32)),
                ('sha256', fields.CharField(max_length=64)),
                ('compression', fields.CharField(max_length=16)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={'table': 'delta_patch', 'app': 'models', 'unique_together': (('package_id', 'base_id'),), 'indexes': [Index(fields=['package_id', 'base_version'])], 'pk_attr': 'id', 'table_description': "A detools patch that turns the base package's image into the package's image (issue 14)."},
            bases=['Model'],
        ),
    ]
