'use strict';
// A serialized google.protobuf.FileDescriptorSet of the messages a worker declares
// (JobType.file_descriptor_set), built from a protobufjs Root: the files that define the
// messages and every file they depend on, dependencies first, type names fully qualified.

const path = require('node:path');
const protobuf = require('protobufjs');
const descriptor = require('protobufjs/ext/descriptor');

// The files of google/protobuf's well-known types, which protobufjs loads without a file name.
const WELL_KNOWN = {
  Any: 'any', Duration: 'duration', Timestamp: 'timestamp', Empty: 'empty', FieldMask: 'field_mask',
  Struct: 'struct', Value: 'struct', ListValue: 'struct', NullValue: 'struct',
  DoubleValue: 'wrappers', FloatValue: 'wrappers', Int64Value: 'wrappers', UInt64Value: 'wrappers',
  Int32Value: 'wrappers', UInt32Value: 'wrappers', BoolValue: 'wrappers', StringValue: 'wrappers', BytesValue: 'wrappers',
};

/** The proto package of a top-level type or enum: its parent namespace's full name, without the dot. */
function packageOf(object) {
  return object.parent ? object.parent.fullName.replace(/^\./, '') : '';
}

/**
 * The file name of a top-level type or enum as an import would spell it: the part of the
 * path it was loaded from that starts with its package's directories
 * ("/x/protos/ajs/examples/v1/hash.proto" -> "ajs/examples/v1/hash.proto"), else the base name.
 */
function fileOf(object) {
  const pkg = packageOf(object);
  if (!object.filename) {
    if (pkg === 'google.protobuf' && WELL_KNOWN[object.name]) return `google/protobuf/${WELL_KNOWN[object.name]}.proto`;
    return `${pkg.replace(/\./g, '_') || 'root'}.proto`;
  }
  const file = object.filename.split(path.sep).join('/');
  if (pkg) {
    const dirs = `${pkg.replace(/\./g, '/')}/`;
    const at = file.lastIndexOf(dirs);
    if (at === 0 || (at > 0 && file[at - 1] === '/')) return file.slice(at);
  }
  return path.posix.basename(file);
}

/** The top-level object (a direct child of a package namespace) that holds `object`. */
function topLevel(object) {
  let current = object;
  while (current.parent && (current.parent instanceof protobuf.Type)) current = current.parent;
  return current;
}

/** Every top-level message and enum of the root, by file name. */
function filesOf(root) {
  const files = new Map();
  const visit = (namespace) => {
    for (const nested of namespace.nestedArray) {
      if (nested instanceof protobuf.Type || nested instanceof protobuf.Enum) {
        const name = fileOf(nested);
        if (!files.has(name)) files.set(name, { name, package: packageOf(nested), objects: [] });
        files.get(name).objects.push(nested);
      } else if (nested instanceof protobuf.Namespace && !(nested instanceof protobuf.Service)) {
        visit(nested);
      }
    }
  };
  visit(root);
  return files;
}

/** protoc's name of a map field's entry message: "tag_counts" -> "TagCountsEntry". */
function mapEntryName(fieldName) {
  return `${fieldName.replace(/(?:^|_)([a-z0-9])/g, (_, letter) => letter.toUpperCase())}Entry`;
}

/**
 * Makes a DescriptorProto made by protobufjs into what protoc would write: type names
 * fully qualified (".ajs.examples.v1.Algorithm", not "Algorithm"), map entries named
 * "<Field>Entry", synthetic oneofs (proto3 `optional`) after the real ones; adds the file
 * of each referenced type to `dependencies`.
 */
function qualify(message, type, dependencies) {
  const entries = new Map();
  for (const nested of message.nestedType) {
    if (nested.options && nested.options.mapEntry) entries.set(nested.name, nested);
  }
  for (const field of message.field) {
    if (!field.typeName || field.typeName.startsWith('.')) continue;
    const entry = entries.get(field.typeName);
    if (entry) {
      entry.name = mapEntryName(field.name);
      field.typeName = `${type.fullName}.${entry.name}`;
      continue;
    }
    const found = type.lookup(field.typeName, [protobuf.Type, protobuf.Enum]);
    if (!found) throw new Error(`${type.fullName.slice(1)}: cannot resolve type ${field.typeName}`);
    field.typeName = found.fullName;
    dependencies.add(fileOf(topLevel(found)));
  }
  for (const nested of message.nestedType) {
    const nestedType = entries.has(nested.name) || [...entries.values()].includes(nested) ? null : type.nested && type.nested[nested.name];
    qualify(nested, nestedType instanceof protobuf.Type ? nestedType : type, dependencies); // map entries: their parent's scope
  }
  // Synthetic oneofs (one per proto3 `optional` field) come after every real oneof.
  // (A descriptor message answers 0 for an unset oneofIndex: only own properties are set.)
  const inOneof = (field) => Object.prototype.hasOwnProperty.call(field, 'oneofIndex');
  const synthetic = new Set(message.field.filter((field) => field.proto3Optional && inOneof(field)).map((field) => field.oneofIndex));
  if (synthetic.size) {
    const order = message.oneofDecl.map((_, index) => index);
    order.sort((a, b) => Number(synthetic.has(a)) - Number(synthetic.has(b)) || a - b);
    const position = new Map(order.map((old, index) => [old, index]));
    message.oneofDecl = order.map((old) => message.oneofDecl[old]);
    for (const field of message.field) {
      if (inOneof(field)) field.oneofIndex = position.get(field.oneofIndex);
    }
  }
}

/**
 * The FileDescriptorSet (serialized, a Buffer) of the files of `root` that define the
 * messages named in `fullNames`, with all their dependencies, dependencies first.
 */
function descriptorSet(root, fullNames) {
  root.resolveAll();
  const files = filesOf(root);
  const built = new Map();
  const ordered = [];
  const build = (name, trail = []) => {
    if (built.has(name)) return;
    if (trail.includes(name)) throw new Error(`import cycle: ${[...trail, name].join(' -> ')}`);
    const file = files.get(name);
    const dependencies = new Set();
    const proto = descriptor.FileDescriptorProto.create({ name, package: file.package, syntax: 'proto3' });
    for (const object of file.objects) {
      if (object instanceof protobuf.Type) {
        const message = object.toDescriptor('proto3');
        qualify(message, object, dependencies);
        proto.messageType.push(message);
      } else {
        proto.enumType.push(object.toDescriptor());
      }
    }
    dependencies.delete(name);
    for (const dependency of dependencies) build(dependency, [...trail, name]);
    proto.dependency = [...dependencies];
    built.set(name, proto);
    ordered.push(proto);
  };
  for (const fullName of fullNames) {
    if (!fullName) continue;
    build(fileOf(topLevel(root.lookupTypeOrEnum(fullName))));
  }
  return Buffer.from(descriptor.FileDescriptorSet.encode(descriptor.FileDescriptorSet.create({ file: ordered })).finish());
}

module.exports = { descriptorSet };
